"""Excerpts of a job's text, read with one range read each: the start of a region (the
per-epoch sample's prompt) and a random window of the validation text (generation's
default prompt, as the 2017 tutorial primed its model).

Regions count the job's tokens (`index.Region`): for word and bpe jobs an excerpt is
that many tokens of the piece, decoded to text."""

from __future__ import annotations

import random

from trainer import storage
from trainer.config import Config
from trainer.data import index, scan, tokenization, vocabulary
from trainer.data.index import Region


def read_tokens(region: Region, begin: int, count: int, lowercase: bool,
                tokenizer: tokenization.Tokenizer | None = None) -> str:
    """The text of tokens [begin, begin + count) of the region, in one range read.

    For characters, when they lie at the start of a plain piece only their bytes are
    read (at most 4 per char); otherwise the piece is read, which is bounded by the
    piece size. For word and bpe tokenizers the piece is read and tokenized whole, as
    the job counted it; a character split at either end (bpe) is left out.

    Args:
      region: a region of the job's corpus.
      begin, count: the tokens, from the region's start.
      lowercase: the job's setting.
      tokenizer: the job's tokenizer; None or a `Vocabulary` for characters.
    """
    if tokenizer is not None and tokenizer.kind != "char":
        text = scan.read_piece(region, lowercase)
        ids = tokenizer.encode(text)[region.begin + begin:region.begin + begin + count]
        return b"".join(tokenizer.pieces[i] for i in ids.tolist()).decode("utf-8", "ignore")
    if region.compressed or region.begin + begin > 0:
        return scan.read_text(region, lowercase)[begin:begin + count]
    data = storage.read_range(region.path, region.start,
                              min(region.stop, region.start + 4 * count + scan.LOOKAHEAD),
                              region.version)
    return vocabulary.decode(data, lowercase)[0][:min(count, region.length)]


def snippet(path: str, width: int, lowercase: bool, rng, tail: float = 0.0) -> str:
    """About `width` chars from a random place of a file (in its last `tail` fraction),
    in one range read, for when no index of the file exists."""
    if index.is_compressed(path):
        with scan.open_compressed(path) as stream:
            data = stream.read(4 * width + scan.LOOKAHEAD).removeprefix(scan.BOM)
    else:
        size = storage.size(path)
        lo = int(size * (1 - tail)) if tail else 0
        start = rng.randint(lo, max(lo, size - 4 * width - scan.LOOKAHEAD))
        data = storage.read_range(path, start, start + 4 * width + scan.LOOKAHEAD)
        data = data[scan.boundary(data, 0):] if start else data.removeprefix(scan.BOM)
    return vocabulary.decode(data, lowercase)[0][:width]


def random_excerpt(cfg: Config, seed: int, tokenizer: tokenization.Tokenizer | None = None
                   ) -> tuple[str, str]:
    """A random window of a job's validation text: the default prompt of generation.

    The pieces come from the job's shards.json, and the window is one range read of
    one piece. Without validation data the training text is used. Any failure to
    reach the data (moved files, no credentials) falls back to a newline.

    Args:
      cfg: the job's config (job_dir, data patterns, seq_length, lowercase).
      seed: picks the piece and the window.
      tokenizer: the job's tokenizer (the window is `seq_length` of its tokens).

    Returns:
      (prompt, a description of where it came from).
    """
    rng = random.Random(seed)
    what = "validation" if cfg.val_data or cfg.val_fraction else "training"
    try:
        try:
            record = storage.read_text(storage.join(cfg.job_dir, index.SCAN_RECORD))
        except FileNotFoundError:
            record = None
        known = index.read_record(record, cfg.lowercase, cfg.piece_bytes)
        if known:
            corpus = index.Index(list(known.values()), histogram=None)
            train, val = index.make_regions(corpus, 2, cfg.val_fraction)
            regions = val or train
            region = regions[rng.randrange(len(regions))]
            width = min(cfg.seq_length, region.length)
            begin = rng.randint(0, region.length - width)
            text = read_tokens(region, begin, width, cfg.lowercase, tokenizer)
            unit = ("char" if tokenizer is None or tokenizer.kind == "char"
                    else "token")
            return text, f"a random {width}-{unit} window of the {what} text {region.path}"
        # No corpus (a job directory from elsewhere): a random place of a data file.
        paths = storage.expand_patterns(cfg.val_data or cfg.train_data)
        path = paths[rng.randrange(len(paths))]
        text = snippet(path, cfg.seq_length, cfg.lowercase, rng,
                                    0.0 if cfg.val_data else cfg.val_fraction)
        if len(text) >= 2:
            return text, f"a random {len(text)}-char window of the {what} text {path}"
        reason = "no shard is long enough"
    except Exception as err:  # noqa: BLE001 - any failure means "no data reachable".
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return "\n", f"a newline (no {what} data reachable: {reason})"
