"""Streaming tf.data pipeline: lazy windows over bounded pieces of the corpus.

Regions (`trainer.data.index`: pieces of a few MB of any file) are read one range
at a time, decoded and encoded to the smallest integer dtype; windows are cut by a
batched gather over shuffled start offsets. A worker holds at most
`--shard_cycle` regions (plus the one being refilled), so memory does not grow
with the corpus or with any one file. Every batch takes windows from
`--shard_cycle` regions at once, in a rotation that refills a region's slot from
the next region of the pass when it runs out, so a single-file corpus mixes as
well as a sharded one.

Everything is a pure function of (seed, pass, region): the order of regions in
a pass, the order of each region's windows, and which windows make each batch.
The plan of a pass is computed from window counts alone, so resuming at step s
skips the batches before it without reading or gathering anything.

Workers split the windows of a pass into contiguous, equal shares (they differ
by at most one window), so every window is trained on by some worker, short of
less than one global batch per pass. Evaluation pads its last batches with
windows marked invalid (target -1), so each window is scored exactly once
whatever the number of workers.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from trainer.data import index
from trainer.data import scan
from trainer.data import tokenization
from trainer.config import Config
from trainer.data.index import Region
from trainer.errors import UserError

# Window orders are shuffled within blocks of this many windows (and the blocks'
# order is shuffled), so the permutation held per region stays small.
SHUFFLE_BLOCK = 1 << 16
# Targets of padded evaluation rows: scored as nothing.
IGNORE = -1


def num_windows(length: int, window: int, shift: int) -> int:
    """Windows of `window` tokens at stride `shift` inside `length` tokens."""
    return max(0, (length - window) // shift + 1)


def crossing_windows(regions: Sequence[Region], window: int, shift: int) -> tuple[int, int]:
    """(windows lost to piece boundaries, windows kept) over `regions`."""
    kept = sum(num_windows(r.length, window, shift) for r in regions)
    whole = collections.defaultdict(int)
    for r in regions:
        whole[r.path] += r.length
    return max(0, sum(num_windows(n, window, shift) for n in whole.values()) - kept), kept


def load_region_ids(region: Region, tok: tokenization.Tokenizer, lowercase: bool,
                    stream=None) -> np.ndarray:
    """The ids of the region's tokens: one range read (or the next bytes of a .gz stream)
    of its piece, tokenized whole (as `index.count_tokens` counted it); for characters
    (one id each) only the region's slice is encoded."""
    if tok.kind == "char":
        ids = tok.encode(scan.read_text(region, lowercase, stream))
    else:
        ids = tok.encode(scan.read_piece(region, lowercase, stream))[region.begin:region.end]
    if len(ids) != region.end - region.begin:
        # A file rewritten since the scan: its windows would not fit the counts the
        # job laid its steps out by.
        raise scan.changed(region, f"they now hold {len(ids)} tokens where the scan "
                            f"counted {region.end - region.begin} from token {region.begin}")
    return ids


@dataclasses.dataclass(frozen=True)
class Sharding:
    """This worker's place among `num_workers`: a contiguous share of every pass's windows."""

    worker: int = 0
    num_workers: int = 1

    def share(self, regions: Sequence[Region], window: int, shift: int) -> list[Region]:
        """The regions (cut where a share ends) whose windows are this worker's."""
        counts = [num_windows(r.length, window, shift) for r in regions]
        total = sum(counts)
        lo = total * self.worker // self.num_workers
        hi = total * (self.worker + 1) // self.num_workers
        out, first = [], 0
        for region, n in zip(regions, counts, strict=True):
            a, b = max(lo - first, 0), min(hi - first, n)
            if a < b:
                end = region.begin + (b - 1) * shift + window
                out.append(dataclasses.replace(region, begin=region.begin + a * shift, end=end))
            first += n
        return out


def windows_per_worker(regions: Sequence[Region], window: int, shift: int,
                       num_workers: int) -> list[int]:
    """Windows each worker gets in one pass (they differ by at most one)."""
    total = sum(num_windows(r.length, window, shift) for r in regions)
    return [total * (w + 1) // num_workers - total * w // num_workers for w in range(num_workers)]


def steps_per_pass(regions: Sequence[Region], window: int, shift: int, batch_size: int,
                   replicas_per_worker: int, sharding: Sharding) -> int:
    """Steps every worker can take in one pass (all workers take the same number).

    Each worker must run the same number of steps, or the collectives of a
    multi-worker job would wait forever; a pass leaves out less than one global batch.
    """
    fewest = min(windows_per_worker(regions, window, shift, sharding.num_workers))
    return fewest // (batch_size * replicas_per_worker)


class _Order:
    """A region's window indexes in shuffled order, produced block by block on demand."""

    def __init__(self, count: int, seed: Sequence[int], shuffle: bool):
        self.count, self.seed, self.shuffle = count, list(seed), shuffle
        blocks = math.ceil(count / SHUFFLE_BLOCK)
        self.blocks = (np.random.default_rng(self.seed).permutation(blocks) if shuffle
                       else np.arange(blocks))
        sizes = np.minimum(SHUFFLE_BLOCK, count - self.blocks * SHUFFLE_BLOCK)
        self.ends = np.cumsum(sizes)
        self._cached: tuple[int, np.ndarray] | None = None

    def _block(self, i: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != i:
            b = int(self.blocks[i])
            lo, hi = b * SHUFFLE_BLOCK, min((b + 1) * SHUFFLE_BLOCK, self.count)
            picks = np.arange(lo, hi)
            if self.shuffle:
                picks = np.random.default_rng(self.seed + [b + 1]).permutation(picks)
            self._cached = (i, picks)
        return self._cached[1]

    def take(self, pos: int, count: int) -> np.ndarray:
        out = []
        while count > 0:
            i = int(np.searchsorted(self.ends, pos, side="right"))
            before = int(self.ends[i - 1]) if i else 0
            part = self._block(i)[pos - before:pos - before + count]
            out.append(part)
            pos, count = pos + len(part), count - len(part)
        return np.concatenate(out) if len(out) != 1 else out[0]


def _units(regions: Sequence[Region]) -> list[list[int]]:
    """Groups of region indexes read as one unit: each piece alone, a .gz file's in order."""
    units: list[list[int]] = []
    for i, r in enumerate(regions):
        if r.compressed and units and regions[units[-1][-1]].path == r.path:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def plan(counts: Sequence[int], units: Sequence[Sequence[int]], rows: int, cycle: int,
         seed: int, pass_index: int, shuffle: bool, partial: bool = False
         ) -> Iterator[list[tuple[int, int, int]]]:
    """The batches of one pass as (region, position in its order, windows) takes.

    `cycle` slots each hold a unit; a batch takes about rows/cycle windows from each
    slot in turn, and a slot that runs out is refilled from the next unit of the pass.
    The last, partial batch is yielded only with `partial`.
    """
    order = list(range(len(units)))
    if shuffle:
        order = np.random.default_rng([seed, pass_index]).permutation(len(units)).tolist()
    pending = iter([units[u] for u in order if any(counts[i] for i in units[u])])
    slots: list[list] = []  # [region indexes left in the unit, position]

    def fill() -> list | None:
        unit = next(pending, None)
        if unit is None:
            return None
        left = [i for i in unit if counts[i]]
        return [left, 0]

    for _ in range(min(cycle, len(units))):
        slot = fill()
        if slot is None:
            break
        slots.append(slot)
    per_take = max(1, math.ceil(rows / max(len(slots), 1)))
    turn = 0
    while slots:
        takes, need = [], rows
        while need and slots:
            turn %= len(slots)
            slot = slots[turn]
            region = slot[0][0]
            n = min(per_take, need, counts[region] - slot[1])
            takes.append((region, slot[1], n))
            slot[1] += n
            need -= n
            if slot[1] == counts[region]:
                slot[0].pop(0)
                slot[1] = 0
                if not slot[0]:
                    refill = fill()
                    if refill is None:
                        slots.pop(turn)
                        continue
                    slots[turn] = refill
            turn += 1
        if need and not (partial and takes):
            return
        yield takes


class _Windows:
    """Reads regions and gathers the windows a plan names; holds a few regions at a time."""

    def __init__(self, regions: Sequence[Region], vocab: tokenization.Tokenizer, cfg: Config,
                 shift: int, shuffle: bool, keep: int):
        self.regions, self.vocab, self.cfg = regions, vocab, cfg
        self.shift, self.shuffle, self.keep = shift, shuffle, keep
        self._ids: dict[int, np.ndarray] = {}  # Each region's windows, as a strided view.
        self._orders: dict[int, _Order] = {}
        self._streams: dict[str, object] = {}

    def _load(self, i: int, pass_index: int) -> tuple[np.ndarray, _Order]:
        if i in self._ids:  # Most recently used last: what is evicted is a finished region.
            self._ids[i] = self._ids.pop(i)
        else:
            while len(self._ids) >= self.keep:  # Forget the region used longest ago.
                oldest = next(iter(self._ids))
                del self._ids[oldest], self._orders[oldest]
            region = self.regions[i]
            stream = None
            if region.compressed:
                stream = self._streams.get(region.path)
                if stream is None or stream.tell() > region.start:
                    if len(self._streams) > self.keep:
                        self._streams.pop(next(iter(self._streams))).close()
                    stream = self._streams[region.path] = scan.open_region(region)
            ids = load_region_ids(region, self.vocab, self.cfg.lowercase, stream)
            # A strided view of every window of the region: indexing it copies just the rows.
            self._ids[i] = np.lib.stride_tricks.sliding_window_view(ids, self.cfg.window)
            count = num_windows(region.length, self.cfg.window, self.shift)
            self._orders[i] = _Order(count, [self.cfg.seed, pass_index, i], self.shuffle)
        return self._ids[i], self._orders[i]

    def gather(self, takes: list[tuple[int, int, int]], pass_index: int) -> np.ndarray:
        out = np.empty((sum(t[2] for t in takes), self.cfg.window), self.vocab.dtype)
        row = 0
        for i, pos, n in takes:
            windows, order = self._load(i, pass_index)
            out[row:row + n] = windows[order.take(pos, n) * self.shift]
            row += n
        return out

    def new_pass(self) -> None:
        self._ids.clear()
        self._orders.clear()


def dataset(regions: Sequence[Region], vocab: tokenization.Tokenizer, cfg: Config, *,
            batch_size: int, shift: int, steps: int, replicas_per_worker: int = 1,
            sharding: Sharding = Sharding(), shuffle: bool = True, start_step: int = 0,
            repeat: bool = True) -> tf.data.Dataset:
    """Batches of (inputs, targets) for one worker.

    Args:
      regions: all regions of the split (every worker passes the same list).
      vocab: the tokenizer that encodes the text (a `Vocabulary` for chars).
      cfg: seq_length, objective, seed, shard_cycle and lowercase are read.
      batch_size: windows per element (the per-replica batch).
      shift: stride between window starts.
      steps: steps in one pass (from `steps_per_pass`); each pass yields exactly
        steps * replicas_per_worker elements, padded with invalid rows (targets -1)
        when this worker's share runs out first (evaluation).
      replicas_per_worker: replicas fed by this worker's pipeline.
      sharding: this worker's place among the workers.
      shuffle: shuffle region order and window order (per pass); False for evaluation.
      start_step: global step to start at, for resuming mid-run.
      repeat: endless passes (training) or just one (evaluation).

    Returns:
      A dataset of (x, y) int32 batches: x is (batch, seq_length); y is the same
      shape for the 'sequence' objective, (batch,) for 'last'.
    """
    mine = sharding.share(regions, cfg.window, shift)
    counts = [num_windows(r.length, cfg.window, shift) for r in mine]
    units = _units(mine)
    # Sized by the worker's batch, not the replica's, so the stream of windows is the
    # same however many replicas split it: mirrored training sees one-device batches.
    rows = batch_size * replicas_per_worker
    cycle = max(1, min(cfg.shard_cycle, len(units)))
    first_pass, skip = divmod(start_step, steps) if steps else (0, 0)
    dtype = vocab.dtype

    # Worker batches travel in groups of about 1 MB: one Python call per group, not per batch.
    group = max(1, (1 << 20) // (rows * cfg.window * dtype.itemsize))

    def batches() -> Iterator[np.ndarray]:
        """Every worker batch of the stream, padded when this worker's share runs out."""
        reader = _Windows(mine, vocab, cfg, shift, shuffle, keep=cycle + 1)
        pass_index = first_pass
        while True:
            reader.new_pass()
            takes = plan(counts, units, rows, cycle, cfg.seed, pass_index, shuffle,
                         partial=not repeat)
            done = skip if pass_index == first_pass else 0
            for _ in range(done):
                next(takes, None)
            for batch in itertools.islice(takes, steps - done):
                yield reader.gather(batch, pass_index)
                done += 1
            for _ in range(steps - done):  # Evaluation: this worker's share ran out first.
                yield np.zeros((0, cfg.window), dtype)
            pass_index += 1
            if not repeat:
                return

    streams: list[Iterator[np.ndarray]] = []

    def next_group(i: np.int64) -> tuple[np.ndarray, np.ndarray]:
        """The stream's next `group` worker batches (element 0 starts the stream anew)."""
        if i == 0 or not streams:
            streams[:] = [batches()]
        chunk = list(itertools.islice(streams[0], group))
        valid = np.stack([np.arange(rows) < len(b) for b in chunk])
        windows = np.zeros((len(chunk), rows, cfg.window), dtype)
        for k, b in enumerate(chunk):
            windows[k, :len(b)] = b
        shape = (len(chunk) * replicas_per_worker, batch_size)
        return windows.reshape(shape + (cfg.window,)), valid.reshape(shape)

    def load(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        windows, valid = tf.numpy_function(next_group, [i], (tf.as_dtype(dtype), tf.bool),
                                           stateful=True)
        windows.set_shape([None, batch_size, cfg.window])
        valid.set_shape([None, batch_size])
        return windows, valid

    # A numpy_function over a counter rather than from_generator: a generator dataset's
    # threads kept the interpreter from exiting after SIGTERM. Sequential, so in order.
    total = (steps - skip) if not repeat else 2**62
    ds = tf.data.Dataset.range(-(-total // group)).map(load)
    ds = ds.map(lambda w, valid: to_example(w, None if repeat else valid, cfg.objective))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return ds.with_options(options).unbatch().prefetch(tf.data.AUTOTUNE)


def to_example(windows: tf.Tensor, valid: tf.Tensor | None, objective: str
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """(inputs, targets); targets of invalid rows are IGNORE (training has none: None)."""
    windows = tf.cast(windows, tf.int32)
    x, y = windows[..., :-1], windows[..., -1] if objective == "last" else windows[..., 1:]
    if valid is None:
        return x, y
    return x, tf.where(valid if objective == "last" else valid[..., None], y, IGNORE)
