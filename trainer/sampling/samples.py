"""What generation reads and writes besides the model: the user's prompt (text or a file,
local or gs://) and the samples, rendered as plain text or as JSON with their settings."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from trainer import storage
from trainer.errors import UserError

# Tokens per compiled call when stdout is not a terminal: larger blocks spend less time in
# Python between compiled calls (the text is the same either way).
PIPE_BLOCK = 512


def read_prompt(prime: str | None, prime_file: str | None) -> str | None:
    """The user's prompt from --prime or --prime_file; None when neither is given."""
    if prime is not None and prime_file is not None:
        raise UserError("give either --prime or --prime_file, not both")
    if prime_file is None:
        return prime
    try:
        return storage.read_text(prime_file)
    except FileNotFoundError as err:
        raise UserError(f"--prime_file {prime_file} does not exist") from err
    except UnicodeDecodeError as err:
        raise UserError(f"--prime_file {prime_file} is not UTF-8 text: {err}") from err


def render(samples: Sequence[str], fmt: str, details: dict[str, Any]) -> str:
    """The whole output for --format: plain samples, or JSON with their settings."""
    if fmt == "json":
        return json.dumps({**details, "samples": list(samples)}, ensure_ascii=False,
                          indent=1) + "\n"
    if len(samples) == 1:
        return samples[0]
    return "".join(f"--- sample {i + 1}/{len(samples)} ---\n{s}\n"
                   for i, s in enumerate(samples))


def stdout_block(watched_block: int) -> int:
    """Tokens per compiled call when streaming to stdout: `watched_block` for a person at a
    terminal (text shows up as it comes), PIPE_BLOCK for a pipe or a file."""
    return watched_block if sys.stdout.isatty() else PIPE_BLOCK


def stream_to_stdout(blocks: Iterable[Sequence[str]]) -> None:
    """Writes the first row of each block to stdout as it arrives.

    Args:
      blocks: what `Sampler.stream` yields (one text per row, per block).
    """
    for parts in blocks:
        sys.stdout.write(parts[0])
        sys.stdout.flush()
    if sys.stdout.isatty():
        sys.stdout.write("\n")  # Only for the shell prompt's sake; pipes get the text as is.


def write(texts: Sequence[str], fmt: str, details: dict[str, Any], output: str | None) -> None:
    """Renders the samples (see `render`) to stdout, or to `output` (local or gs://)."""
    text = render(texts, fmt, details)
    if output is None:
        sys.stdout.write(text)
    else:
        storage.write_text(output, text)
