"""What generation reads and writes besides the model: the user's prompt (text or a file,
local or gs://) and the samples, rendered as plain text or as JSON with their settings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from trainer import storage
from trainer.errors import UserError


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
