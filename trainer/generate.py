"""Generates text from a trained job directory.

    python -m trainer.generate --job_dir=runs/shakespeare --length=500
    python -m trainer.generate --job_dir=gs://bucket/run --prime="ROMEO:" --num_samples=4 \\
        --format=json --output=samples.json

The job directory (local or gs://) holds everything needed: config.json,
vocab.json (and tokenizer.json for a word or bpe job) and the best weights named by
best.json. Prompts are encoded by the job's tokenizer and the samples decoded by it;
--length counts characters whatever the tokenizer, and a sample ends at the first
token that reaches it (a word or subword sample may be longer by the rest of that
token). A single text sample streams
to stdout as it is generated; the prompt itself is not repeated there. Notes on
what was loaded and which prompt was used go to stderr. Bad input ends with a
one-line error on stderr and exit status 1 (2 for a bad flag).
"""

from __future__ import annotations

import random

from absl import flags

from trainer import cli
from trainer.data import excerpt
from trainer.sampling import samples


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this entrypoint's flags on `flag_values` (library code takes arguments)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("job_dir", None, "Job directory written by trainer.task (local or "
                        "gs://); config, vocabulary and best weights are read from it.", **fv)
    flags.DEFINE_string("checkpoint", None, "Weights file to use instead of the best one: a "
                        "file name inside --job_dir or a full path.", **fv)
    flags.DEFINE_string("prime", None, "Prompt text to continue; default: a random window of "
                        "the validation text, or a newline when no data is reachable.", **fv)
    flags.DEFINE_string("prime_file", None, "Read the prompt from this file (local or gs://) "
                        "instead of --prime.", **fv)
    flags.DEFINE_integer("length", 500, "Number of characters to generate per sample (a "
                         "word or bpe model ends at the first token that reaches it).",
                         lower_bound=0, **fv)
    flags.DEFINE_integer("num_samples", 1, "Number of samples generated together in one "
                         "batch, all from the same prompt.", lower_bound=1, **fv)
    flags.DEFINE_integer("seed", None, "Random seed; the same seed, prompt and settings give "
                         "the same text (default: a fresh seed, printed on stderr).",
                         lower_bound=0, **fv)
    flags.DEFINE_float("temperature", 0.8, "Divides the logits before sampling: lower is "
                       "more predictable, higher more varied; 0 means --greedy.",
                       lower_bound=0, **fv)
    flags.DEFINE_integer("top_k", 0, "Sample only among the k most likely characters "
                         "(0 = all).", lower_bound=0, **fv)
    flags.DEFINE_float("top_p", 1.0, "Sample only among the most likely characters whose "
                       "probabilities add up to p (1 = all).", upper_bound=1.0, **fv)
    flags.DEFINE_boolean("greedy", False, "Always pick the most likely character (no "
                         "randomness).", **fv)
    flags.DEFINE_string("output", None, "Write the result to this file (local or gs://) "
                        "instead of stdout.", **fv)
    flags.DEFINE_enum("format", "text", ["text", "json"], "text: the samples as plain text; "
                      "json: the samples with the prompt and every setting.", **fv)
    flags.DEFINE_enum("oov", "error", ["error", "skip"], "What to do with prompt characters "
                      "the model's vocabulary lacks: stop with an error, or skip them.", **fv)
    flags.mark_flag_as_required("job_dir", flag_values)


def run(fv: flags.FlagValues) -> None:
    """Loads the job directory and writes the samples the parsed flags `fv` ask for."""
    # Imported here so that --help and flag errors never wait for TensorFlow.
    from trainer import job_loader
    from trainer.errors import UserError
    from trainer.sampling.next_char import MAX_SEED
    from trainer.sampling.sampler import STREAM_BLOCK, Sampler, Settings, encode_prompt

    settings = Settings(temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p,
                        greedy=fv.greedy).validate()
    prompt = samples.read_prompt(fv.prime, fv.prime_file)
    seed = fv.seed if fv.seed is not None else random.SystemRandom().randrange(2**31)
    if seed + fv.num_samples - 1 > MAX_SEED:  # Row i draws with seed + i, an int64.
        raise UserError(f"--seed + --num_samples - 1 must be at most {MAX_SEED}, got "
                        f"{seed + fv.num_samples - 1}")
    cfg, tokenizer, model, pointer = job_loader.load_job(fv.job_dir, fv.checkpoint)
    weights = fv.checkpoint or pointer.get("weights", "?")
    note = (f" (epoch {pointer['epoch']}, {pointer['monitor']} {pointer['value']:.4f})"
            if {"epoch", "monitor", "value"} <= pointer.keys() else "")
    cli.say(f"loaded {weights}{note} from {fv.job_dir}")
    oov = fv.oov
    if prompt is None:
        prompt, source = excerpt.random_excerpt(cfg, seed, tokenizer)
        oov = "skip"  # Not the user's text: chars outside the vocabulary are just left out.
        cli.say(f"prompt: {source}:\n{prompt}")
    else:
        source = "--prime_file" if fv.prime_file is not None else "--prime"
        missing = encode_prompt(tokenizer, prompt, "skip").skipped
        if missing and oov == "skip":
            cli.say(f"skipping {len(missing)} prompt character(s) the vocabulary lacks: "
                    + ", ".join(repr(c) for c in missing[:20]))
    if fv.seed is None:
        cli.say(f"seed: {seed} (pass --seed={seed} to repeat this output)")

    sampler = Sampler(model, tokenizer)
    prompts = [prompt] * fv.num_samples
    if fv.num_samples == 1 and fv.format == "text" and fv.output is None:
        samples.stream_to_stdout(sampler.stream(prompts, fv.length, settings, seed, oov,
                                                block=samples.stdout_block(STREAM_BLOCK)))
        return
    texts = sampler.generate(prompts, fv.length, settings, seed, oov)
    details = {"job_dir": fv.job_dir, "checkpoint": weights, "prompt": prompt,
               "prompt_source": source, "length": fv.length, "seed": seed, "oov": oov,
               "settings": {"temperature": settings.temperature, "top_k": settings.top_k,
                            "top_p": settings.top_p, "greedy": settings.is_greedy}}
    samples.write(texts, fv.format, details, fv.output)
    if fv.output is not None:
        cli.say(f"wrote {len(texts)} sample(s) to {fv.output}")

if __name__ == "__main__":
    cli.main(define_flags, run)
