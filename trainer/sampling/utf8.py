"""Which byte-level BPE ids may come next so that a row's text stays valid UTF-8.

A bpe id decodes to a fixed byte string that may begin or end inside a character, so
an id drawn at the wrong moment (continuation bytes while no character is open, a new
character while one still waits for bytes, a lead byte that no character starts with)
would decode to U+FFFD. The samplers forbid such ids at every step instead: each row
carries the state of a UTF-8 automaton over the bytes drawn so far, and an id is
allowed only when all of its bytes are accepted from that state.

The automaton is the strict one of RFC 3629 (no overlong forms, no surrogates, nothing
past U+10FFFF), so its states also remember the narrower range of the first
continuation byte after E0, ED, F0 and F4:

  0  between characters          4  after E0: 2 bytes to come, the next A0..BF
  1  1 continuation byte to come 5  after ED: 2 bytes to come, the next 80..9F
  2  2 continuation bytes        6  after F0: 3 bytes to come, the next 90..BF
  3  3 continuation bytes        7  after F4: 3 bytes to come, the next 80..8F

Per id and state, `Utf8Tables` holds whether the id is allowed and the state after it.
The state after a forbidden id (fed in a prompt of raw ids) is the one a lenient
decoder would reach: an unexpected byte closes the open character and is read again
from state 0, and a byte that begins nothing leaves state 0. A prompt encoded from
text therefore always ends in state 0, and sampling keeps every row's text valid.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from trainer.data.tokenization import Tokenizer

STATES = 8
# The strict automaton's sink; never a row's state.
_REJECT = STATES


def _byte_table() -> np.ndarray:
    """(STATES + 1, 256) int32: the strict automaton's next state per (state, byte)."""
    table = np.full((STATES + 1, 256), _REJECT, np.int32)
    table[0, :0x80] = 0
    table[0, 0xC2:0xE0] = 1
    table[0, 0xE0] = 4
    table[0, 0xE1:0xF0] = 2
    table[0, 0xED] = 5
    table[0, 0xF0] = 6
    table[0, 0xF1:0xF4] = 3
    table[0, 0xF4] = 7
    for state, after, low, high in ((1, 0, 0x80, 0xC0), (2, 1, 0x80, 0xC0),
                                    (3, 2, 0x80, 0xC0), (4, 1, 0xA0, 0xC0),
                                    (5, 1, 0x80, 0xA0), (6, 2, 0x90, 0xC0),
                                    (7, 2, 0x80, 0x90)):
        table[state, low:high] = after
    return table


_STRICT = _byte_table()
# A rejected byte is read again from state 0; one that state 0 rejects too leaves 0.
_LENIENT = np.where(_STRICT[:STATES] != _REJECT, _STRICT[:STATES],
                    np.where(_STRICT[0] != _REJECT, _STRICT[0], 0)[None, :]).astype(np.int32)


class Utf8Tables(NamedTuple):
    """Per (state, id): whether the id may come next, and the state after it."""

    # (STATES, vocab) bool: the id's bytes are all accepted from the state.
    allowed: np.ndarray
    # (STATES, vocab) int32: the state after the id (the lenient one where not allowed).
    next: np.ndarray

    @classmethod
    def of(cls, pieces: Sequence[bytes]) -> Utf8Tables:
        """The tables of a tokenizer's `pieces` (each id's bytes)."""
        vocab = len(pieces)
        lengths = np.array([len(p) for p in pieces], np.int64)
        width = int(lengths.max(initial=0))
        data = np.zeros((vocab, max(width, 1)), np.uint8)
        flat = np.frombuffer(b"".join(pieces), np.uint8)
        rows = np.repeat(np.arange(vocab), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        data[rows, np.arange(len(flat)) - np.repeat(starts, lengths)] = flat
        strict = np.repeat(np.arange(STATES, dtype=np.int32)[:, None], vocab, axis=1)
        lenient = strict.copy()
        for j in range(width):
            live, byte = lengths > j, data[:, j]
            strict = np.where(live, _STRICT[strict, byte], strict)
            lenient = np.where(live, _LENIENT[lenient, byte], lenient)
        allowed = strict != _REJECT
        # Where allowed, the strict and the lenient runs are the same run.
        return cls(allowed, lenient.astype(np.int32))

    def state_after(self, ids: Iterable[int], state: int = 0) -> int:
        """The state after feeding `ids` from `state`."""
        for i in ids:
            state = int(self.next[state, i])
        return state

    def mask(self) -> np.ndarray:
        """(STATES, vocab) float32: 0 where allowed, -inf elsewhere (added to logits)."""
        return np.where(self.allowed, 0.0, -np.inf).astype(np.float32)

    def web_spec(self) -> dict[str, object]:
        """The tables as model.js carries them (format in web/tokenizer.js)."""
        packed = self.next.astype(np.uint8) | (self.allowed.astype(np.uint8) << 7)
        return {"states": STATES, "table": base64.b64encode(packed.tobytes()).decode("ascii")}


def tables_of(tokenizer: Tokenizer) -> Utf8Tables | None:
    """The tables of a bpe tokenizer; None for char and word ones (their ids are whole
    characters, so every id may follow every other)."""
    if tokenizer.kind != "bpe":
        return None
    return Utf8Tables.of(tokenizer.pieces)
