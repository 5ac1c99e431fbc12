"""Stage 2 of training (`trainer.training.train`): the data a job reads and how long it takes.

The corpus scan (split among the workers), the vocabulary and the tokenizer (loaded from the
job directory, taken from a fine-tuning base, or built from the scan: word counts, or a BPE
trained on the chief), the training and validation regions, and the steps of a pass, an
epoch and the validation, the same on every worker.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from absl import logging

from trainer import checkpoints, storage
from trainer.config import Config
from trainer.data import index, lane_pipeline, scan, tokenization, window_pipeline
from trainer.data.index import Region
from trainer.data.vocabulary import Vocabulary
from trainer.errors import UserError
from trainer.training import distribution, init_from
from trainer.training.distribution import Placement


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """What the job reads and how many steps each part takes (the same on every worker)."""

    chars: Vocabulary                  # vocab.json: the training text's characters.
    tokenizer: tokenization.Tokenizer    # What the model reads: `chars` itself for char.
    train_regions: list[Region]
    val_regions: list[Region]
    train_chars: int
    train_tokens: int
    sharding: window_pipeline.Sharding
    pass_steps: int          # Steps of one pass over the training text.
    steps_per_epoch: int
    total_steps: int
    val_steps: int           # Windowed validation: steps of val_batch windows per replica.
    val_batch: int
    val_lanes: int           # Carried validation: lanes per replica (0: none fits).
    val_lane_steps: int


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The scan's result: the vocabulary, the tokenizer and the regions."""

    chars: Vocabulary
    tokenizer: tokenization.Tokenizer
    train_regions: list[Region]
    val_regions: list[Region]
    train_chars: int
    train_tokens: int


def scan_corpus(cfg: Config, job: checkpoints.JobDir, strategy, place: Placement,
                base: init_from.Base | None = None) -> Corpus:
    """Scans the corpus (split across workers), and loads or builds the vocabulary.

    A new fine-tuning job (`base`) takes the base's vocabulary, extended by the
    characters of this training text that it lacks (a word or bpe base: its tokenizer
    unchanged).

    A resumed job (vocab.json present) reads again only the files whose fingerprint
    changed since the scan recorded in shards.json; a restart on a large bucket corpus
    then costs one metadata request per file instead of a full read.
    """
    saved = job.read("vocab.json")
    combine = distribution.sum_over_workers(strategy, place)
    made: dict[str, Any] = {}
    if saved:
        made["chars"] = Vocabulary.from_json(saved)
        made["tokenizer"] = tokenization.load(cfg.tokenizer, made["chars"], job.read, cfg.job_dir)

    def tokenizer_for(corpus: index.Index) -> tokenization.Tokenizer:
        if saved:
            _warn_new_chars(made["tokenizer"], corpus.counts)
            return made["tokenizer"]
        if base:
            made["chars"] = (init_from.vocabulary(cfg, base, corpus.counts)
                             if cfg.tokenizer == "char" else base.vocab)
            made["tokenizer"] = (made["chars"] if cfg.tokenizer == "char"
                                 else init_from.tokenizer(cfg, base, corpus.counts))
            return made["tokenizer"]
        chars = made["chars"] = Vocabulary.from_counts(corpus.counts, cfg.lowercase)
        if cfg.tokenizer == "word":
            made["tokenizer"] = tokenization.WordTokenizer.from_counts(chars, corpus.words,
                                                                     cfg.max_vocab)
        elif cfg.tokenizer == "bpe":
            made["tokenizer"] = _train_bpe(cfg, corpus, place, combine)
        else:
            made["tokenizer"] = chars
        return made["tokenizer"]

    corpus, tok = index.prepare(
        storage.expand_patterns(cfg.train_data),
        storage.expand_patterns(cfg.val_data) if cfg.val_data else [],
        lowercase=cfg.lowercase, piece_bytes=cfg.piece_bytes, read=job.read, write=job.write,
        reuse=saved is not None, worker=place.worker, num_workers=place.num_workers,
        combine=combine, tokenizer_for=tokenizer_for,
        keep_words=2 * cfg.max_vocab if cfg.tokenizer == "word" and not saved and not base
        else 0)
    train_regions, val_regions = index.make_regions(corpus, cfg.window, cfg.val_fraction)
    files = corpus.split("train")
    chars = sum(f.chars for f in files)
    tokens = sum(sum(f.lengths()) for f in files)
    if tok is not made["chars"]:
        unknown = sum(f.unknown_words for f in files)
        logging.info("tokenizer %s: %d ids; the training text is %d tokens for %d chars (%.3f "
                     "chars per token)%s", cfg.tokenizer, tok.size, tokens, chars,
                     chars / max(tokens, 1),
                     f"; {unknown} unknown words spelled out ({100 * unknown / max(tokens, 1):.2f}%"
                     " of tokens)" if cfg.tokenizer == "word" else "")
    return Corpus(made["chars"], tok, train_regions, val_regions, chars, tokens)


def _warn_new_chars(tok: tokenization.Tokenizer, counts) -> None:
    """On a resume: says how much of the text read again (files new or changed since the
    job's scan) its vocabulary lacks, which trains as the unknown-character id."""
    lacking = tok.missing("".join(counts))
    if lacking:
        share = sum(counts[c] for c in lacking) / max(sum(counts.values()), 1)
        logging.warning("%d character(s) of the new or changed training text (%.1f%% of it, "
                        "e.g. %r) are not in this job's vocabulary: they train as the "
                        "unknown-character id; to learn them, start a new job, or one that "
                        "fine-tunes this one (--init_from)", len(lacking), 100 * share,
                        "".join(lacking[:20]))


def _train_bpe(cfg: Config, corpus: index.Index, place: Placement, combine
               ) -> tokenization.BpeTokenizer:
    """Trains the BPE tokenizer on the chief, from a sample of the training text, and
    gives it to every worker (through two sums over the workers)."""
    text = ""
    if place.is_chief:
        began = time.monotonic()
        sample = index.sample_pieces(corpus, tokenization.BPE_SAMPLE_BYTES)
        streams = scan.Streams()  # A .gz file's sampled pieces, read in one forward run.
        try:
            text = tokenization.BpeTokenizer.train(
                (scan.read_piece(r, cfg.lowercase, streams.get(r)) for r in sample),
                cfg.max_vocab, cfg.lowercase).to_json()
        finally:
            streams.close()
        logging.info("trained the BPE tokenizer on %d of %d training pieces (%.1f MB) in %.1f s",
                     len(sample), sum(len(f.pieces) for f in corpus.split("train")),
                     sum(r.stop - r.start for r in sample) / 1e6, time.monotonic() - began)
    return tokenization.BpeTokenizer(tokenization.share_text(text, place.is_chief,
                                                          place.num_workers, combine),
                                   cfg.lowercase)


def plan_data(cfg: Config, job: checkpoints.JobDir, strategy, place: Placement,
              base: init_from.Base | None = None) -> DataPlan:
    """Scans the corpus and sizes the passes, epochs and validation; refuses too little text."""
    corpus = scan_corpus(cfg, job, strategy, place, base)
    train_regions, val_regions = corpus.train_regions, corpus.val_regions
    sharding = window_pipeline.Sharding(place.worker, place.num_workers)
    unit = "chars" if corpus.tokenizer.kind == "char" else f"{corpus.tokenizer.kind} tokens"
    global_batch = cfg.batch_size * place.replicas
    lanes_per_worker = cfg.batch_size * place.replicas_per_worker
    if cfg.carry_state:
        pass_steps = lane_pipeline.lane_steps(train_regions, cfg.seq_length, lanes_per_worker,
                                              sharding)
        if pass_steps < 1:
            raise UserError(f"the training data is too short for {global_batch} lanes of more "
                            f"than {cfg.seq_length} {unit} each (--carry_state)")
    else:
        pass_steps = window_pipeline.steps_per_pass(train_regions, cfg.window, cfg.shift,
                                                    cfg.batch_size, place.replicas_per_worker,
                                                    sharding)
        if pass_steps < 1:
            raise UserError(f"the training data holds fewer windows than one global batch of "
                            f"{global_batch} (seq_length {cfg.seq_length}, shift {cfg.shift})")
    crossing, windows = window_pipeline.crossing_windows(train_regions, cfg.window, cfg.shift)
    logging.info("a pass trains on %d of %d windows: %d (%.3f%%) cross a piece boundary, %d do "
                 "not fill the last global batch", pass_steps * global_batch, windows + crossing,
                 crossing, 100 * crossing / max(windows + crossing, 1),
                 windows - pass_steps * global_batch)
    steps_per_epoch = cfg.steps_per_epoch or pass_steps
    val_steps, val_batch, val_lanes, val_lane_steps = 0, cfg.batch_size, 0, 0
    if val_regions:
        # Every validation window is scored once: each worker's share is padded with
        # invalid rows up to the largest share, in batches no larger than needed.
        most = max(window_pipeline.windows_per_worker(val_regions, cfg.window, cfg.seq_length,
                                                      place.num_workers))
        if most < 1:
            raise UserError(f"the validation data holds no window of {cfg.window} {unit}")
        val_batch = max(1, min(cfg.batch_size, -(-most // place.replicas_per_worker)))
        val_steps = -(-most // (val_batch * place.replicas_per_worker))
        val_steps = min(val_steps, cfg.val_steps or val_steps)
        val_lanes, val_lane_steps = _carried_validation(val_regions, cfg, place, sharding)
    plan = DataPlan(corpus.chars, corpus.tokenizer, train_regions, val_regions,
                    corpus.train_chars, corpus.train_tokens, sharding, pass_steps,
                    steps_per_epoch, cfg.epochs * steps_per_epoch, val_steps, val_batch,
                    val_lanes, val_lane_steps)
    reading = (f"{lanes_per_worker} contiguous lanes per worker, state carried"
               if cfg.carry_state else
               f"windows of {cfg.window} {unit} every {cfg.shift} ('{cfg.objective}')")
    logging.info("vocabulary: %d ids; training text: %d chars in %d region(s); %s; %d "
                 "steps/epoch; %d validation steps (windowed), %d carried over %d lanes",
                 corpus.tokenizer.size, corpus.train_chars, len(train_regions), reading,
                 steps_per_epoch,
                 val_steps, val_lane_steps, val_lanes * place.replicas)
    return plan


def _carried_validation(regions, cfg: Config, place: Placement, sharding) -> tuple[int, int]:
    """(lanes per replica, steps) for carried validation: up to --batch_size lanes, fewer
    when the text is too short for one step of that many; (0, 0) when none fits."""
    batch = cfg.batch_size
    while batch:
        count = lane_pipeline.lane_steps(regions, cfg.seq_length,
                                         batch * place.replicas_per_worker, sharding)
        if count:
            return batch, min(count, cfg.val_steps or count)
        batch //= 2
    return 0, 0
