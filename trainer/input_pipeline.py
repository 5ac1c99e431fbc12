"""Streaming tf.data pipeline: lazy windows over sharded text.

Per shard: read its bytes through `storage`, decode and encode to the smallest
integer dtype, then cut windows by a batched gather over shuffled start offsets.
Only one chunk of windows per shard exists at a time; the corpus is never
expanded into a (windows x length) array. Shards are interleaved so each batch
mixes several of them, and every random choice is a stateless op seeded by
(seed, pass, shard), so the stream is a pure function of the config and the
step it starts from: a resumed job sees the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import storage, vocabulary
from trainer.config import Config
from trainer.errors import UserError

# Starts are shuffled within blocks of this many windows (and block order is
# shuffled), so the permutation held per shard stays small however big the shard.
SHUFFLE_BLOCK = 1 << 16


@dataclasses.dataclass(frozen=True)
class Region:
    """A span [begin, end) of chars of one shard that windows are cut from."""

    path: str
    begin: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def num_windows(length: int, window: int, shift: int) -> int:
    """Windows of `window` chars at stride `shift` inside `length` chars."""
    return max(0, (length - window) // shift + 1)


def make_regions(train: vocabulary.Scan, val: vocabulary.Scan | None,
                 cfg: Config) -> tuple[list[Region], list[Region]]:
    """Splits scanned shards into training and validation regions.

    With `val` (from --val_data) whole shards go to each side; with
    --val_fraction the tail of every shard is validation, and training windows
    end before it, so no training window touches a validation char. Regions
    shorter than one window are dropped with a warning.

    Returns:
      (train_regions, val_regions); val_regions is empty without validation.
    """
    train_regions, val_regions = [], []
    for shard in train.shards:
        cut = shard.chars - int(shard.chars * cfg.val_fraction)
        train_regions.append(Region(shard.path, 0, cut))
        if cfg.val_fraction:
            val_regions.append(Region(shard.path, cut, shard.chars))
    if val is not None:
        val_regions = [Region(s.path, 0, s.chars) for s in val.shards]
    train_regions = _keep_long_enough(train_regions, cfg.window, "training")
    if not train_regions:
        raise UserError(
            f"no training shard holds one window of {cfg.window} chars "
            f"({len(train.shards)} shard(s), {train.total_chars} chars in all)")
    if val is not None or cfg.val_fraction:
        val_regions = _keep_long_enough(val_regions, cfg.window, "validation")
        if not val_regions:
            raise UserError(f"no validation shard holds one window of {cfg.window} chars")
    return train_regions, val_regions


def _keep_long_enough(regions: list[Region], window: int, what: str) -> list[Region]:
    kept = [r for r in regions if r.length >= window]
    short = [r for r in regions if 0 < r.length < window]
    if short:
        logging.warning("skipping %d %s shard(s) shorter than one window of %d chars, e.g. %s",
                        len(short), what, window, short[0].path)
    return kept


@dataclasses.dataclass(frozen=True)
class Sharding:
    """How one worker's share of the data is chosen among `num_workers`."""

    worker: int = 0
    num_workers: int = 1

    def regions(self, regions: Sequence[Region]) -> list[Region]:
        """By file when every worker gets at least one shard, else all regions."""
        if self.by_file(regions):
            return list(regions[self.worker::self.num_workers])
        return list(regions)

    def by_file(self, regions: Sequence[Region]) -> bool:
        return len(regions) >= self.num_workers

    def window_stride(self, regions: Sequence[Region]) -> tuple[int, int]:
        """(offset, stride) over each region's windows when sharding by window."""
        if self.by_file(regions):
            return 0, 1
        return self.worker, self.num_workers


def windows_per_worker(regions: Sequence[Region], window: int, shift: int,
                       sharding: Sharding) -> list[int]:
    """Windows each worker sees in one pass."""
    counts = []
    for worker in range(sharding.num_workers):
        mine = Sharding(worker, sharding.num_workers)
        offset, stride = mine.window_stride(regions)
        counts.append(sum(len(range(offset, num_windows(r.length, window, shift), stride))
                          for r in mine.regions(regions)))
    return counts


def steps_per_pass(regions: Sequence[Region], window: int, shift: int, batch_size: int,
                   replicas_per_worker: int, sharding: Sharding) -> int:
    """Steps every worker can take in one pass (the slowest worker decides).

    Each worker must run the same number of steps, or the collectives of a
    multi-worker job would wait forever; a pass drops the last partial batch.
    """
    return min(n // batch_size // replicas_per_worker
               for n in windows_per_worker(regions, window, shift, sharding))


def _load_ids(vocab: vocabulary.Vocabulary, lowercase: bool):
    def load(path: bytes, begin: int, end: int) -> np.ndarray:
        text, _ = vocabulary.decode(storage.read_bytes(path.decode()), lowercase)
        return vocab.encode(text[begin:end])
    return load


def dataset(regions: Sequence[Region], vocab: vocabulary.Vocabulary, cfg: Config, *,
            batch_size: int, shift: int, steps: int, replicas_per_worker: int = 1,
            sharding: Sharding = Sharding(), shuffle: bool = True, start_step: int = 0,
            repeat: bool = True) -> tf.data.Dataset:
    """Batches of (inputs, targets) for one worker.

    Args:
      regions: all regions of the split (every worker passes the same list).
      vocab: the vocabulary that encodes the text.
      cfg: seq_length, objective, seed, shard_cycle and lowercase are read.
      batch_size: windows per element (the per-replica batch).
      shift: stride between window starts.
      steps: steps in one pass (from `steps_per_pass`); each pass yields exactly
        steps * replicas_per_worker elements.
      replicas_per_worker: replicas fed by this worker's pipeline.
      sharding: this worker's place among the workers.
      shuffle: shuffle shard order and starts (per pass); False for evaluation.
      start_step: global step to start at, for resuming mid-run.
      repeat: endless passes (training) or just one (evaluation).

    Returns:
      A dataset of (x, y) int32 batches: x is (batch, seq_length); y is the same
      shape for the 'sequence' objective, (batch,) for 'last'.
    """
    mine = sharding.regions(regions)
    offset, stride = sharding.window_stride(regions)
    window = cfg.window
    id_dtype = tf.as_dtype(vocab.dtype)
    paths = tf.constant([r.path for r in mine])
    begins = tf.constant([r.begin for r in mine], tf.int64)
    ends = tf.constant([r.end for r in mine], tf.int64)
    load = _load_ids(vocab, cfg.lowercase)
    # Sized by the worker's batch, not the replica's, so the stream of windows is the
    # same however many replicas split it: mirrored training sees one-device batches.
    chunk = max(1, batch_size * replicas_per_worker // min(cfg.shard_cycle, len(mine)))
    per_pass = steps * replicas_per_worker

    def seed(*parts) -> tf.Tensor:
        mixed = tf.constant(cfg.seed, tf.int64)
        for part in parts:
            mixed = mixed * 1_000_003 + tf.cast(part, tf.int64)
        return tf.stack([tf.constant(cfg.seed, tf.int64), mixed])

    def region_windows(index: tf.Tensor, pass_index: tf.Tensor) -> tf.data.Dataset:
        ids = tf.numpy_function(load, [paths[index], begins[index], ends[index]], id_dtype,
                                stateful=False)
        ids.set_shape([None])
        count = (tf.shape(ids, out_type=tf.int64)[0] - window) // shift + 1
        starts_count = tf.maximum(tf.constant(0, tf.int64), (count - offset + stride - 1) // stride)
        blocks = (starts_count + SHUFFLE_BLOCK - 1) // SHUFFLE_BLOCK
        order = tf.range(blocks)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed(pass_index, index))

        def block_chunks(block: tf.Tensor) -> tf.data.Dataset:
            lo = block * SHUFFLE_BLOCK
            picks = tf.range(lo, tf.minimum(lo + SHUFFLE_BLOCK, starts_count))
            if shuffle:
                picks = tf.random.experimental.stateless_shuffle(
                    picks, seed(pass_index, index, block + 1))
            starts = (picks * stride + offset) * shift
            n_chunks = (tf.size(starts, out_type=tf.int64) + chunk - 1) // chunk

            def gather(j: tf.Tensor) -> tf.Tensor:
                some = starts[j * chunk:(j + 1) * chunk]
                return tf.gather(ids, some[:, None] + tf.range(window, dtype=tf.int64))
            return tf.data.Dataset.range(n_chunks).map(gather)

        return tf.data.Dataset.from_tensor_slices(order).flat_map(block_chunks)

    def one_pass(pass_index: tf.Tensor) -> tf.data.Dataset:
        order = tf.range(len(mine), dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed(pass_index))
        # A sequential interleave: a parallel one also opens shards ahead of the cycle,
        # which held twice the shards in memory (bench/input_pipeline.py's RSS figures)
        # and was no faster, since a gather over ids in memory is cheap. A sequential
        # interleave is deterministic (tf.data warns if told so without parallel calls).
        ds = tf.data.Dataset.from_tensor_slices(order).interleave(
            lambda i: region_windows(i, pass_index),
            cycle_length=min(cfg.shard_cycle, len(mine)))
        return ds.rebatch(batch_size, drop_remainder=True).take(per_pass)

    first_pass, skip = divmod(start_step, steps) if steps else (0, 0)
    passes = tf.data.Dataset.range(first_pass, first_pass + 1 if not repeat else 2**62)
    ds = passes.flat_map(one_pass).skip(skip * replicas_per_worker)
    ds = ds.map(lambda w: _to_example(w, cfg.objective), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _to_example(windows: tf.Tensor, objective: str) -> tuple[tf.Tensor, tf.Tensor]:
    windows = tf.cast(windows, tf.int32)
    if objective == "last":
        return windows[:, :-1], windows[:, -1]
    return windows[:, :-1], windows[:, 1:]


# --- Lanes: contiguous streams for carried-state training and evaluation ---


def load_region_ids(region: Region, vocab: vocabulary.Vocabulary, lowercase: bool) -> np.ndarray:
    """The ids of one region's chars, in order (the one call that reads a region)."""
    return _load_ids(vocab, lowercase)(region.path.encode(), region.begin, region.end)


@dataclasses.dataclass(frozen=True)
class LaneLayout:
    """Where one worker's lanes lie in the text its regions form, end to end.

    The worker's regions, concatenated in corpus order, form one text. With
    sharding by file that text is the worker's own and holds its `count` lanes;
    otherwise every worker reads the same text, cut into count x num_workers
    lanes, and this worker's lanes are the block from `first`.
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
    mine = tuple(sharding.regions(regions))
    total = sum(r.length for r in mine)
    if sharding.by_file(regions):
        return LaneLayout(mine, lanes, 0, total // lanes)
    return LaneLayout(mine, lanes, sharding.worker * lanes,
                      total // (lanes * sharding.num_workers))


def lane_steps(regions: Sequence[Region], seq_length: int, lanes: int,
               sharding: Sharding) -> int:
    """Steps every worker can take in one pass over its lanes (the slowest decides)."""
    return min(lane_layout(regions, lanes, Sharding(w, sharding.num_workers)).steps(seq_length)
               for w in range(sharding.num_workers))


class _LaneReader:
    """Reads spans of the concatenated regions, loading each region only while in use.

    Between calls to `step_done`, the regions that the current step's spans touch are
    held; the rest are dropped. A lane lies inside at most two regions at a time (one
    at a region boundary), so at most min(2 x lanes, regions) regions are in memory,
    and lanes that walk through the same region share one copy of it.
    """

    def __init__(self, regions: Sequence[Region], vocab: vocabulary.Vocabulary,
                 lowercase: bool):
        self.regions, self.vocab, self.lowercase = regions, vocab, lowercase
        self.bounds = np.cumsum([0] + [r.length for r in regions])
        self.held: dict[int, np.ndarray] = {}
        self.used: dict[int, np.ndarray] = {}

    def _ids(self, index: int) -> np.ndarray:
        ids = self.used.get(index)
        if ids is None:
            ids = self.held.get(index)
            if ids is None:
                ids = load_region_ids(self.regions[index], self.vocab, self.lowercase)
            self.used[index] = ids
        return ids

    def read(self, begin: int, size: int) -> np.ndarray:
        """Chars [begin, begin + size) of the concatenated text, as ids."""
        parts, pos, end = [], begin, begin + size
        index = int(np.searchsorted(self.bounds, begin, side="right")) - 1
        while pos < end:
            start = int(self.bounds[index])
            take = min(end, int(self.bounds[index + 1])) - pos
            parts.append(self._ids(index)[pos - start:pos - start + take])
            pos += take
            index += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def step_done(self) -> None:
        self.held, self.used = self.used, {}


def lanes_dataset(regions: Sequence[Region], vocab: vocabulary.Vocabulary, cfg: Config, *,
                  batch_size: int, steps: int, replicas_per_worker: int = 1,
                  sharding: Sharding = Sharding(), start_step: int = 0,
                  repeat: bool = True) -> tf.data.Dataset:
    """Batches of contiguous text for carried-state training and evaluation.

    This worker's regions, end to end, are cut into B = batch_size x
    replicas_per_worker lanes of equal length (see `lane_layout`). Step t gives
    lane i its chars [t x seq_length, (t + 1) x seq_length + 1) as inputs and
    next-char targets, so the state a model carries out of step t is the state
    at the start of lane i's inputs at step t + 1. Row r of replica k's batch is
    always lane k x batch_size + r. A pass is `steps` steps; the next one starts
    the lanes over, flagged by `reset` so the carried state is zeroed.

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

    Returns:
      A dataset of (x, y, reset): x and y are (batch_size, seq_length) int32,
      reset a bool scalar, True on the first step of a pass and at `start_step`.
    """
    lanes = batch_size * replicas_per_worker
    layout = lane_layout(regions, lanes, sharding)
    seq = cfg.seq_length
    if steps < 1 or layout.steps(seq) < steps:
        raise UserError(f"{steps} step(s) of {seq} chars do not fit in lanes of "
                        f"{layout.length} chars ({lanes} lanes)")
    starts = (layout.first + np.arange(lanes)) * layout.length

    def generate():
        reader = _LaneReader(layout.regions, vocab, cfg.lowercase)
        _, t = divmod(start_step, steps)
        reset = True
        while True:
            while t < steps:
                rows = np.stack([reader.read(int(s) + t * seq, seq + 1) for s in starts])
                reader.step_done()
                for k in range(replicas_per_worker):
                    yield rows[k * batch_size:(k + 1) * batch_size], reset
                reset = False
                t += 1
            if not repeat:
                return
            t, reset = 0, True

    ds = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec((batch_size, seq + 1), tf.as_dtype(vocab.dtype)),
        tf.TensorSpec((), tf.bool)))
    ds = ds.map(lambda w, reset: (*_to_example(w, "sequence"), reset))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return ds.with_options(options).prefetch(2)
