"""What the web and ONNX exports carry of a word or bpe tokenizer to encode and decode.

A char model needs only vocab.json (ids 1..N are its characters). A word or bpe
model's folder also holds the job's tokenizer.json as the job wrote it (for bpe the
`tokenizers` library's own file, read by `tokenizers.Tokenizer.from_file`), and the
exports describe how ids map (`ids_note`). The page gets the same tokenizer in the
form its JavaScript reads (`web_spec`): every id's bytes, and for bpe the merges as
ids in rank order and the UTF-8 tables of `trainer.sampling.utf8`, with which the page
never draws an id that would break UTF-8.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from trainer.data import tokenization
from trainer.data.vocabulary import OOV_ID, Vocabulary
from trainer.sampling.utf8 import tables_of

_NOTES = {
    "word": (
        "Ids of tokenizer.json (kind word): 0 is never drawn (set its logit to -inf) and "
        "decodes to U+FFFD; 1 is <unk>, which decodes to nothing (an unknown word is fed as "
        "<unk> followed by its characters' ids); 2..N+1 are vocab.json's chars in order; then "
        "tokenizer.json's words in order. Prompts are split by its rule (Python re, Unicode "
        "\\w): a word token found among the words takes its id, any other token its "
        "characters' ids after <unk> (a single character: its id alone, 0 if unknown). "
        "Decoding: join the ids' UTF-8 bytes."),
    "bpe": (
        "tokenizer.json is the `tokenizers` library's byte-level BPE file "
        "(tokenizers.Tokenizer.from_file): the model's id = the library's id + 1. Id 0 is "
        "never drawn (set its logit to -inf). Encode: [i + 1 for i in "
        "tok.encode(prompt, add_special_tokens=False).ids]; decode: tok.decode([i - 1 for i "
        "in ids]) (or join the ids' bytes and decode UTF-8, which keeps a character split "
        "across ids whole when streaming). An id's bytes may begin or end inside a "
        "character: a sampler must, at every step, set to -inf the logit of every id whose "
        "bytes cannot continue the text drawn so far as valid UTF-8 (continuation bytes "
        "while no character is open, a new character while one still waits for bytes, "
        "bytes no character has), as trainer.sampling.utf8 does, or the text may decode "
        "to U+FFFD."),
}


def chars_of(tokenizer: tokenization.Tokenizer, chars: Vocabulary | None = None
             ) -> Vocabulary:
    """The job's character vocabulary (its vocab.json): `chars`, else the tokenizer's own.

    A bpe tokenizer holds no characters, so its exports are given the job's.
    """
    if chars is None:
        chars = tokenizer if isinstance(tokenizer, Vocabulary) else getattr(tokenizer, "chars",
                                                                            None)
    if chars is None:
        raise ValueError("a bpe model's export needs the job's characters (vocab.json)")
    return chars


def files(tokenizer: tokenization.Tokenizer) -> dict[str, str]:
    """The tokenizer's file for an export folder: {} for char, else tokenizer.json."""
    if tokenizer.kind == "char":
        return {}
    return {tokenization.FILE: tokenizer.to_json()}


def ids_note(tokenizer: tokenization.Tokenizer) -> dict[str, Any] | None:
    """What model.json says about the ids of a word or bpe model (None for char)."""
    kind = tokenizer.kind
    if kind == "char":
        return None
    return {"kind": kind, "file": tokenization.FILE, "vocab_size": tokenizer.size,
            "lowercase": tokenizer.lowercase, "ids": _NOTES[kind]}


def _bpe_merges(tokenizer: tokenization.BpeTokenizer) -> list[list[int]]:
    """The merges in rank order as [left id, right id, merged id], ids of the model."""
    model = json.loads(tokenizer.hf_json)["model"]
    vocab = model["vocab"]
    merges = []
    for merge in model["merges"]:
        # Older files write a merge as "left right", newer ones as [left, right].
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merges.append([vocab[left] + 1, vocab[right] + 1, vocab[left + right] + 1])
    return merges


def web_spec(tokenizer: tokenization.Tokenizer) -> dict[str, Any] | None:
    """What model.js holds of a word or bpe tokenizer (format in web/tokenizer.js).

    Args:
      tokenizer: the job's tokenizer.

    Returns:
      None for char; else {"kind", "pieces": base64 of every id's bytes, and for word
      "unk_id", "first_char", "first_word", "rule"; for bpe "merges" and "utf8"}.
    """
    kind = tokenizer.kind
    if kind == "char":
        return None
    spec = {"kind": kind, "oov_id": OOV_ID,
            "pieces": [base64.b64encode(p).decode("ascii") for p in tokenizer.pieces]}
    if kind == "word":
        spec.update(unk_id=tokenization.UNK_ID, first_char=2, first_word=tokenizer.first_word,
                    rule=tokenization.WORD_RULE.pattern)
    else:
        spec["merges"] = _bpe_merges(tokenizer)
        spec["utf8"] = tables_of(tokenizer).web_spec()
    return spec
