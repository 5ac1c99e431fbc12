"""A bpe model never draws an id that would break UTF-8 (trainer.sampling.utf8).

The tables are checked on hand-built pieces; then a model whose logits are forced
towards ids that cannot continue the text (stray continuation bytes, lead bytes of
unfinished characters, bytes no character has) is sampled through the Sampler, the
server's batcher over blocks and batched rows, and the exported SavedModel: the text
is valid UTF-8 every time, and the mask only removes ids, never changes the others.
"""

from __future__ import annotations

import queue
import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import models
from trainer.config import Config
from trainer.data.tokenization import BpeTokenizer
from trainer.data.vocabulary import OOV_ID, Vocabulary
from trainer.sampling import saved_model
from trainer.sampling.next_char import Rule, Settings, row_arrays
from trainer.sampling.sampler import Sampler, encode_prompt
from trainer.sampling.utf8 import STATES, Utf8Tables, tables_of
from trainer.serving import backends, batcher
from trainer.serving.request import Instance

CHARS = ["é", "日", "🎉"]  # Two, three and four bytes.


def _splits(data: bytes) -> list[list[bytes]]:
    """Every way of cutting `data` into non-empty consecutive pieces."""
    if not data:
        return [[]]
    return [[data[:k], *rest] for k in range(1, len(data) + 1) for rest in _splits(data[k:])]


def _walk(tables: Utf8Tables, index: dict[bytes, int], parts: list[bytes],
          state: int = 0) -> tuple[bool, int]:
    """(every part allowed in turn, the state after them)."""
    for part in parts:
        i = index[part]
        if not tables.allowed[state, i]:
            return False, state
        state = int(tables.next[state, i])
    return True, state


def test_tables_follow_every_split_of_two_three_and_four_byte_chars():
    pieces = [bytes([b]) for b in range(256)]
    for char in CHARS:
        data = char.encode()
        pieces += [data[i:j] for i in range(len(data)) for j in range(i + 2, len(data) + 1)]
    pieces += [b"a\xe6", b"\x97\xa5b", b"\xc3\xa9\xe6\x97", b"\xe6a", b"\xc0\x80",
               b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf5"]
    pieces = list(dict.fromkeys(pieces))
    index = {p: i for i, p in enumerate(pieces)}
    tables = Utf8Tables.of(pieces)
    assert tables.allowed.shape == tables.next.shape == (STATES, len(pieces))
    for char in CHARS:
        data = char.encode()
        for parts in _splits(data):
            ok, state = _walk(tables, index, parts)
            assert ok and state == 0, parts
            # Mid-character, the pending bytes are all that may come: no new character.
            sofar = 0
            for part in parts[:-1]:
                sofar = int(tables.next[sofar, index[part]])
                assert sofar != 0
                assert not tables.allowed[sofar, index[b"a"]]
                assert not tables.allowed[sofar, index[data[:1]]]
                assert not tables.allowed[sofar, index[b"a\xe6"]]
        # A stray continuation id is never allowed between characters.
        for k in range(1, len(data)):
            assert not tables.allowed[0, index[data[k:k + 1]]]
            assert not tables.allowed[0, index[data[k:]]]
    # Too many continuation bytes: after "é"'s lead byte only one fits.
    assert _walk(tables, index, [b"\xc3", b"\xa9"])[0]
    assert not _walk(tables, index, [b"\xc3", b"\x97\xa5b"])[0]
    # Ids that open a character and close another, or hold text after a lead byte.
    assert _walk(tables, index, [b"a\xe6", b"\x97\xa5b"]) == (True, 0)
    assert _walk(tables, index, [b"\xc3\xa9\xe6\x97", b"\xa5"]) == (True, 0)
    # Never allowed anywhere: broken inside, overlong, a surrogate, past U+10FFFF.
    for bad in (b"\xe6a", b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80", b"\xf5", b"\xc1", b"\xff"):
        assert not tables.allowed[:, index[bad]].any(), bad
    # The narrower first continuation byte after E0, ED, F0 and F4.
    assert _walk(tables, index, [b"\xe0", b"\xa0", b"\x80"]) == (True, 0)
    assert not _walk(tables, index, [b"\xe0", b"\x80"])[0]
    assert not _walk(tables, index, [b"\xf0", b"\x80"])[0]
    assert _walk(tables, index, [b"\xf4", b"\x8f", b"\xbf", b"\xbf"]) == (True, 0)
    # A prompt of raw ids that breaks off a character: the lenient state after it.
    assert tables.state_after([index[b"\xe6"], index[b"a"]]) == 0
    assert tables.state_after([index[b"\xc3"], index[b"\xe6"]]) == 2


def test_allowed_steps_are_exactly_the_valid_utf8_sequences():
    pieces = [bytes([b]) for b in range(256)] + [c.encode()[i:j] for c in CHARS
                                                 for i in range(4) for j in range(i + 2, 5)]
    pieces = [p for p in dict.fromkeys(pieces) if p]
    tables, rng = Utf8Tables.of(pieces), random.Random(0)
    for _ in range(3000):
        ids = [rng.randrange(len(pieces)) for _ in range(rng.randrange(1, 6))]
        state, ok = 0, True
        for i in ids:
            ok = ok and bool(tables.allowed[state, i])
            state = int(tables.next[state, i])
        try:
            b"".join(pieces[i] for i in ids).decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        assert (ok and state == 0) == valid, ids


def test_char_and_word_tokenizers_have_no_tables():
    assert tables_of(Vocabulary(list("ab"))) is None


TEXT = "the café 日本語 and 🎉 party, naïve 日本 🙂 the end.\n" * 20


@pytest.fixture(scope="module")
def forced() -> tuple[BpeTokenizer, keras.Model]:
    """A bpe tokenizer and a model whose logits favour ids that break UTF-8.

    Every id's logit gets a bias: continuation-only ids and lone lead bytes the most,
    so an unmasked sampler would draw them out of place and again and again.
    """
    tok = BpeTokenizer.train([TEXT], 300)
    keras.utils.set_random_seed(3)
    model = models.build_model(Config(embedding_dim=8, rnn_units=16, num_layers=1), tok.size)
    rng = np.random.default_rng(0)
    bias = rng.normal(0.0, 1.0, tok.size).astype(np.float32)
    for i, piece in enumerate(tok.pieces):
        if piece and piece[0] & 0xC0 == 0x80:
            bias[i] += 8.0  # Starts with a continuation byte.
        if piece and piece[-1] >= 0xC0:
            bias[i] += 6.0  # Ends with a lead byte.
    dense = model.get_layer("logits")
    dense.kernel.assign(dense.kernel * 0.5)
    dense.bias.assign(bias)
    return tok, model


def _valid(text: str) -> bool:
    return "\ufffd" not in text and text.encode("utf-8").decode("utf-8") == text


PROMPTS = ["the café", "", "日本", "🎉 x"]


def test_forced_model_breaks_utf8_without_the_mask(forced):
    tok, model = forced
    sampler = Sampler(model, tok, jit_compile=False)
    prompt = encode_prompt(tok, "the").ids
    logits, states = sampler.begin([prompt])
    raw = model(prompt[None], training=False).numpy()[0, -1]
    best = int(np.argmax(raw))
    assert tok.pieces[best][0] & 0xC0 == 0x80  # The favourite: a stray continuation id.
    assert not np.isfinite(logits.numpy()[0, best])  # ...masked between characters.
    assert states[-1].numpy().tolist() == [0]


@pytest.mark.parametrize("jit", [False, True])
def test_forced_model_samples_valid_text_greedy_and_with_temperature(forced, jit):
    tok, model = forced
    sampler = Sampler(model, tok, jit_compile=jit)
    for settings in (Settings(greedy=True), Settings(1.0), Settings(1.5, top_k=40)):
        texts = sampler.generate(PROMPTS, 80, settings, seed=5)
        assert all(_valid(t) and len(t) >= 80 for t in texts), texts
        streamed = list(sampler.stream(PROMPTS, 80, settings, seed=5, block=3))
        assert ["".join(b[i] for b in streamed) for i in range(len(PROMPTS))] == texts
    # Not just ASCII: whole multi-byte characters still come out.
    assert any(ord(c) > 127 for t in texts for c in t)


def test_mask_only_removes_the_ids_that_break_utf8(forced):
    tok, model = forced
    sampler = Sampler(model, tok, jit_compile=False)
    tables = sampler.utf8
    prompts = [encode_prompt(tok, p).ids for p in ("the café 日本", "🎉")]
    logits, states = sampler.begin(prompts)
    assert states[-1].numpy().tolist() == [0, 0]  # Text prompts end between characters.
    settings = Settings(1.0)
    ids, _, _, seen = sampler.advance(logits, states, 40, np.zeros(2, np.int32),
                                      np.arange(2, dtype=np.int64), row_arrays([settings] * 2),
                                      Rule.for_rows([settings]), keep_logits=True)
    for row, prompt in enumerate(prompts):
        full = model(np.concatenate([prompt, ids[row]])[None], training=False).numpy()[0]
        raw = full[len(prompt) - 1:len(prompt) - 1 + ids.shape[1]]
        state = 0
        for t, i in enumerate(ids[row]):
            allowed = tables.allowed[state].copy()
            allowed[OOV_ID] = False
            assert np.array_equal(np.isfinite(seen[row, t]), allowed)
            np.testing.assert_allclose(seen[row, t][allowed], raw[t][allowed], atol=1e-4)
            assert allowed[i]
            state = int(tables.next[state, i])


def _served(backend: backends.Backend, prompts: list[str], settings: Settings) -> list[str]:
    """Each prompt's text through the batcher, all rows at once in blocks of 3 tokens."""
    running = batcher.Batcher(backend, max_batch=4, window_ms=50, block=3)
    try:
        outs = []
        for i, prompt in enumerate(prompts):
            instance = Instance(prompt, 60, settings, 11 + i, "error")
            got: queue.Queue = queue.Queue()
            running.submit(running.encode(instance), instance,
                           lambda *block, put=got.put: put(block))
            outs.append(got)
        texts = []
        for got in outs:
            parts = []
            while (block := got.get(timeout=60)) != (None, None):
                assert block[1] is None, block[1]
                parts.append(block[0])
            texts.append("".join(parts))
        return texts
    finally:
        running.close()


def test_serving_and_the_saved_model_carry_the_state_across_blocks(forced, tmp_path):
    tok, model = forced
    sampler = Sampler(model, tok, jit_compile=False)
    settings = Settings(1.0)
    want = [sampler.generate([p], 60, settings, seed=11 + i)[0] for i, p in enumerate(PROMPTS)]
    assert all(_valid(t) for t in want)
    backend = backends.SamplerBackend(sampler, {})
    assert _served(backend, PROMPTS, settings) == want
    backend.pad_batches = True  # Three rows padded to four with copies of row 0.
    assert _served(backend, PROMPTS[:3], settings) == want[:3]
    export_dir = str(tmp_path / "export")
    saved_model.export(model, tok, export_dir, max_length=200)
    backend = backends.load_backend(export_dir, jit_compile=False)
    logits, states = backend.begin([encode_prompt(tok, "日本").ids])
    assert states[0].shape[1] == 2 * 16 + 1  # (h, c), then the UTF-8 state.
    assert _served(backend, PROMPTS, settings) == want
    # The ids-out signature masks too.
    loaded = tf.saved_model.load(export_dir)
    out = loaded.signatures["generate_seeded"](
        ids=tf.constant(encode_prompt(tok, "the")[0][None, :]), length=tf.constant(50),
        temperature=tf.constant(0.0), seed=tf.constant(0, tf.int64))["generated_ids"].numpy()
    assert _valid(tok.stream_decoder().feed(out[0].tolist()))
