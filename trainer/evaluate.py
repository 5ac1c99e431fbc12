"""Scores a trained job directory on text files: nats/char, bits/char, perplexity.

    python -m trainer.evaluate --job_dir=runs/shakespeare --data='test/*.txt'
    python -m trainer.evaluate --job_dir=gs://bucket/run --data='gs://bucket/test/*' \\
        --format=json

Two ways, as the training job reports them (`trainer.training.evaluation`): windowed
(seq_length-char windows, each from a zero state: the job's `val_loss`) and
carried (the text cut into --batch_size contiguous lanes with the LSTM state
carried from chunk to chunk: `val_carried_loss`). Whatever the job's tokenizer,
the figures are per character of the text (each token's loss spread over the
characters it covers), beside the per-token ones; a word model's unknown words
count as their `<unk>` plus their spelling, and their share is reported.
Characters the model's vocabulary lacks are counted and reported, and left out of
the scores. Its threads are sized for this machine as a training job here would size
them (`TF_NUM_INTRAOP_THREADS` / `TF_NUM_INTEROP_THREADS` override), whatever the job
trained on. Bad input ends with a one-line error on stderr and exit status 1 (2 for a
bad flag).
"""

from __future__ import annotations

import json
from typing import Any

from absl import flags

from trainer import cli


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this entrypoint's flags on `flag_values`."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("job_dir", None, "Job directory written by trainer.task (local or "
                        "gs://); config, vocabulary and best weights are read from it.", **fv)
    flags.DEFINE_string("data", None, "Comma-separated file patterns of the text to score "
                        "(local or gs://), scored as one text in sorted order.", **fv)
    flags.DEFINE_string("checkpoint", None, "Weights file to use instead of the best one: a "
                        "file name inside --job_dir or a full path.", **fv)
    flags.DEFINE_integer("batch_size", 0, "Windows per batch, and lanes of carried scoring "
                         "(fewer lanes: more context per char, slower); 0 = the job's "
                         "--batch_size.", lower_bound=0, **fv)
    flags.DEFINE_integer("seq_length", 0, "Length of the windows of windowed scoring, and of "
                         "each carried chunk, in the model's tokens; 0 = the job's "
                         "--seq_length. Scores models trained on different lengths on the "
                         "same windows.", lower_bound=0, **fv)
    flags.DEFINE_enum("format", "text", ["text", "json"], "text: a few lines for people; "
                      "json: every figure, one object.", **fv)
    flags.mark_flags_as_required(["job_dir", "data"], flag_values)


def render(result: dict[str, Any]) -> str:
    """The result as a few lines of text."""
    tokens = result["tokenizer"] != "char"
    lines = [f"job {result['job_dir']} ({result['checkpoint']})",
             f"data: {result['files']} file(s), {result['chars']:,} chars" +
             (f", {result['tokens']:,} {result['tokenizer']} tokens "
              f"({result['chars'] / max(result['tokens'], 1):.3f} chars per token)"
              if tokens else "")]
    if result["tokenizer"] == "word":
        share = 100 * result["unknown_words"] / max(result["tokens"], 1)
        lines.append(f"unknown words: {result['unknown_words']:,} ({share:.2f}% of tokens), "
                     "each scored as <unk> plus its spelling")
    if result["oov_chars"]:
        shown = " ".join(repr(c) for c in result["oov_distinct"][:10])
        more = " ..." if len(result["oov_distinct"]) > 10 else ""
        lines.append(f"not in the vocabulary: {result['oov_chars']:,} chars "
                     f"({len(result['oov_distinct'])} distinct: {shown}{more}), left out "
                     "of the scores")
    else:
        lines.append("not in the vocabulary: 0 chars")
    for mode in ("windowed", "carried"):
        if mode in result:
            m = result[mode]
            per_token = (f" ({m['nats_per_token']:.4f} nats/token over "
                         f"{m['tokens_scored']:,} tokens)" if tokens else "")
            lines.append(f"{mode}: {m['nats_per_char']:.4f} nats/char, {m['bits_per_char']:.4f} "
                         f"bits/char, perplexity {m['perplexity']:.3f} over "
                         f"{m['chars_scored']:,} chars{per_token} ({m['how']})")
    return "\n".join(lines)


def run(fv: flags.FlagValues) -> None:
    """Scores the job directory on the text the parsed flags `fv` name; prints the result."""
    # Imported here: --helpshort should not wait for TensorFlow.
    from trainer import job_loader, storage
    from trainer.training import distribution, evaluation

    # This machine's threads, as a training job here would pick them (not the ones the
    # job trained with, elsewhere): sized before the model starts TensorFlow.
    threads = distribution.set_threads(job_loader.read_config(fv.job_dir).replace(
        intra_op_threads=-1, inter_op_threads=-1))
    cfg, vocab, model, pointer = job_loader.load_job(fv.job_dir, fv.checkpoint)
    if fv.seq_length:
        cfg = cfg.replace(seq_length=fv.seq_length)
    paths = storage.expand_patterns(fv.data)
    result = {"job_dir": fv.job_dir, "checkpoint": fv.checkpoint or pointer.get("weights", ""),
              **evaluation.score_files(paths, cfg, vocab, model, fv.batch_size,
                                             parts=distribution.batch_parts(threads))}
    print(json.dumps(result, indent=1, ensure_ascii=False) if fv.format == "json"
          else render(result))


if __name__ == "__main__":
    cli.main(define_flags, run)
