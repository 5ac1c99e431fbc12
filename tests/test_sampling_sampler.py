"""Tests for trainer.sampling.sampler: carried state equals the full model, seeds, choice rules."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from training_jobs import TOKEN_TEXT, token_job

from trainer import generate, job_loader, models
from trainer.config import Config
from trainer.data import excerpt
from trainer.data.vocabulary import OOV_ID, Vocabulary
from trainer.errors import UserError
from trainer.sampling import next_char
from trainer.sampling.next_char import Rule, row_arrays
from trainer.sampling.sampler import STREAM_BLOCK, Sampler, Settings, encode_prompt, start_id
from trainer.sampling.tokens import OutputText

VOCAB = Vocabulary(list("\n .,;!?abcdefghijklmnopqrstuvwxyzABC"))
CFG = Config(embedding_dim=8, rnn_units=24, num_layers=2, dropout=0.2)


def _model(seed: int = 1, cfg: Config = CFG) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = models.build_model(cfg, VOCAB.size)
    # Freshly initialised weights give near-uniform next-char distributions; larger
    # ones make them peaked and context-dependent, as a trained model's are.
    model.set_weights([w * 5.0 for w in model.get_weights()])
    embedding = model.get_layer("embedding").embeddings
    embedding.assign(embedding * 10.0)
    return model


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return _model()


@pytest.fixture(scope="module")
def sampler(model: keras.Model) -> Sampler:
    return Sampler(model, VOCAB)


def _full_model_probs(model: keras.Model, ids: np.ndarray) -> np.ndarray:
    """Next-char probabilities after every prefix, from the whole-sequence model."""
    logits = model(ids[None], training=False).numpy()[0]
    logits[:, OOV_ID] = -np.inf
    return tf.nn.softmax(logits).numpy()


def _draws(sampler: Sampler, encoded: list[np.ndarray], settings: Settings, seed: int,
           blocks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, the logits each was drawn from) through `begin`, then `advance` per block."""
    logits, states = sampler.begin(encoded)
    seeds = np.arange(seed, seed + len(encoded), dtype=np.int64)
    arrays, rule = row_arrays([settings] * len(encoded)), Rule.for_rows([settings])
    ids, seen, done = [], [], 0
    for n in blocks:
        step0 = np.full(len(encoded), done, np.int32)
        out = sampler.advance(logits, states, n, step0, seeds, arrays, rule, keep_logits=True)
        ids.append(out[0])
        seen.append(out[3])
        logits, states, done = out[1], out[2], done + n
    return np.concatenate(ids, axis=1), np.concatenate(seen, axis=1)


def test_carried_state_matches_full_model_at_every_step(model, sampler):
    prompts = ["the cat sat", "", "a?", "on the mat, then"]
    encoded = [encode_prompt(VOCAB, p).ids for p in prompts]
    length = 40
    ids, logits = _draws(sampler, encoded, Settings(temperature=1.0), 3, [16, 16, 8])
    assert ids.shape == logits.shape[:2] == (len(prompts), length)
    # The stepping interface draws what `generate` draws for the same seeds.
    assert [VOCAB.decode(row.tolist()) for row in ids] == sampler.generate(
        prompts, length, Settings(temperature=1.0), seed=3)
    for row, prompt in enumerate(encoded):
        # An empty prompt is fed as the start char.
        prompt = prompt if len(prompt) else np.array([start_id(VOCAB)])
        full = _full_model_probs(model, np.concatenate([prompt, ids[row]]))
        expected = full[len(prompt) - 1:len(prompt) - 1 + length]
        np.testing.assert_allclose(tf.nn.softmax(logits[row]).numpy(), expected, atol=1e-5)


def test_same_seed_same_text_and_blocks_continue_one_stream(sampler):
    (text,) = sampler.generate(["the "], 60, Settings(1.0), seed=7)
    assert len(text) == 60
    assert sampler.generate(["the "], 60, Settings(1.0), seed=7) == [text]
    assert sampler.generate(["the "], 60, Settings(1.0), seed=8) != [text]
    streamed = "".join(p[0] for p in sampler.stream(["the "], 60, Settings(1.0), seed=7,
                                                    block=7))
    assert streamed == text


def test_top_k_1_and_zero_temperature_equal_greedy(sampler):
    prompts = ["the cat", "b"]
    greedy = sampler.generate(prompts, 50, Settings(greedy=True))
    assert sampler.generate(prompts, 50, Settings(temperature=0.0), seed=1) == greedy
    assert sampler.generate(prompts, 50, Settings(temperature=1e-4), seed=2) == greedy
    assert sampler.generate(prompts, 50, Settings(1.5, top_k=1), seed=3) == greedy
    assert sampler.generate(prompts, 50, Settings(1.5, top_p=1e-6), seed=4) == greedy
    assert sampler.generate(prompts, 50, Settings(1.5), seed=4) != greedy


@pytest.mark.parametrize("settings,allowed", [(Settings(2.0, top_k=3), 3),
                                              (Settings(1.0, top_p=0.5), None)])
def test_draws_stay_inside_the_filtered_set(sampler, settings, allowed):
    encoded = [encode_prompt(VOCAB, "abc").ids] * 8
    ids, logits = _draws(sampler, encoded, settings, 5, [30])
    order = np.argsort(-logits, axis=-1)
    rank = np.take_along_axis(np.argsort(order, axis=-1), ids[..., None], axis=-1)[..., 0]
    if allowed is None:  # top_p: every char ranked above the drawn one held < p of the mass.
        probs = tf.nn.softmax(logits / settings.temperature).numpy()
        before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(
            probs, order, -1)
        assert np.all(np.take_along_axis(before, rank[..., None], -1) < settings.top_p)
    else:
        assert rank.max() < allowed
    assert len(np.unique(ids)) > 1


def test_oov_id_is_never_drawn(model):
    dense = model.get_layer("logits")
    bias = dense.bias.numpy()
    try:
        dense.bias.assign(np.where(np.arange(VOCAB.size) == OOV_ID, 100.0, bias))
        (text,) = Sampler(model, VOCAB).generate(["abc"], 40, Settings(3.0), seed=1)
    finally:
        dense.bias.assign(bias)
    assert "\ufffd" not in text and len(text) == 40


def test_length_zero_and_empty_prompt(sampler):
    assert sampler.generate(["abc"], 0) == [""]
    assert sampler.generate(["a", ""], 0) == ["", ""]
    assert list(sampler.stream(["abc"], 0)) == []
    # An empty prompt starts from a newline.
    assert sampler.generate([""], 30, seed=2) == sampler.generate(["\n"], 30, seed=2)
    assert len(sampler.generate([""], 30, seed=2)[0]) == 30


def test_batch_rows_equal_rows_generated_alone(sampler):
    prompts = ["the long prompt here", "ab", ""]
    batch = sampler.generate(prompts, 25, Settings(greedy=True))
    assert batch == [sampler.generate([p], 25, Settings(greedy=True))[0] for p in prompts]


def test_encode_prompt_oov_error_names_the_chars_and_skip_drops_them():
    with pytest.raises(UserError, match=r"2 character\(s\).*'#'.*'é'.*--oov=skip") as err:
        encode_prompt(VOCAB, "ab#cé#")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"'#' \(send oov=skip\)"):
        encode_prompt(VOCAB, "ab#c", hint="send oov=skip")
    skipped = encode_prompt(VOCAB, "ab#cé#", oov="skip")
    np.testing.assert_array_equal(skipped.ids, VOCAB.encode("abc"))
    assert skipped.skipped == ["#", "é"]
    with pytest.raises(UserError, match="oov"):
        encode_prompt(VOCAB, "abc", oov="replace")
    # Normalised as the training text: lowercased for a lowercase vocabulary, and
    # "\r\n" is a newline (its "\r" is neither an error nor skipped).
    lower = Vocabulary(list("abc \n"), lowercase=True)
    prompt = encode_prompt(lower, "AbC\r\na")
    np.testing.assert_array_equal(prompt.ids, lower.encode("abc\na"))
    assert prompt.skipped == []
    assert encode_prompt(lower, "").ids.shape == (0,)


def test_sampler_sees_the_current_weights(model):
    sampler = Sampler(model, VOCAB)
    before = sampler.generate(["abc"], 30, seed=1)
    weights = model.get_weights()
    try:
        model.set_weights(_model(seed=2).get_weights())
        after = sampler.generate(["abc"], 30, seed=1)
        assert after != before
        assert after == Sampler(model, VOCAB).generate(["abc"], 30, seed=1)
    finally:
        model.set_weights(weights)


def test_cudnn_eligible_weights_load_into_a_non_cudnn_model(tmp_path, monkeypatch):
    # On a GPU the "auto" layers train with the cuDNN kernel; here the same weights
    # file must load into layers that can only run the generic kernel.
    trained = _model(seed=4)
    assert all(models.cudnn_eligible(layer) for layer in models.lstm_layers(trained))
    path = str(tmp_path / "w.weights.h5")
    trained.save_weights(path)

    plain_lstm = models.lstm_layer

    def no_cudnn(units, name):
        layer = plain_lstm(units, name)
        layer.use_cudnn = False
        return layer

    monkeypatch.setattr(models, "lstm_layer", no_cudnn)
    loaded = models.build_model(CFG, VOCAB.size)
    assert not any(layer.use_cudnn for layer in models.lstm_layers(loaded))
    loaded.load_weights(path)
    ids = VOCAB.encode("the cat sat on the mat")[None].astype(np.int32)
    np.testing.assert_allclose(loaded(ids).numpy(), trained(ids).numpy(), atol=1e-5)
    settings = Settings(temperature=0.9, top_k=5)
    assert (Sampler(loaded, VOCAB).generate(["the"], 40, settings, seed=9)
            == Sampler(trained, VOCAB).generate(["the"], 40, settings, seed=9))


def test_settings_validate():
    with pytest.raises(UserError, match="top_p"):
        Settings(top_p=0.0).validate()
    with pytest.raises(UserError, match="temperature"):
        Settings(temperature=-1.0).validate()
    with pytest.raises(UserError, match="top_k"):
        Settings(top_k=-1).validate()


def test_rows_keep_their_own_seed_and_settings_in_a_batch(sampler):
    # What lets the server batch requests: each row is what it would be alone.
    prompts = ["the cat", "", "on the mat, then", "b"]
    rows = [Settings(1.0), Settings(0.7, top_k=5), Settings(1.2, top_p=0.8), Settings(greedy=True)]
    seeds = [11, 3, 3, 2**40 + 7]
    batch = sampler.generate(prompts, 30, rows, seeds)
    alone = [sampler.generate([p], 30, s, [seed])[0]
             for p, s, seed in zip(prompts, rows, seeds)]
    assert batch == alone
    assert len(set(batch)) == len(batch)
    # One int seed gives the rows seed, seed + 1, ...: same prompts, different texts.
    same = sampler.generate(["the "] * 3, 30, Settings(1.0), seed=20)
    assert same == [sampler.generate(["the "], 30, Settings(1.0), seed=20 + i)[0]
                    for i in range(3)]
    assert len(set(same)) == 3


def test_xla_and_graph_loops_give_the_same_text(model):
    compiled, graph = Sampler(model, VOCAB), Sampler(model, VOCAB, jit_compile=False)
    for settings in (Settings(1.0), Settings(0.9, top_k=4, top_p=0.9), Settings(greedy=True)):
        assert (compiled.generate(["the", "a b"], 40, settings, seed=5)
                == graph.generate(["the", "a b"], 40, settings, seed=5))


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def test_uniform_is_the_documented_hash_on_cpu_and_under_xla():
    seeds = np.array([0, 1, 2**33 + 5, 2**62], np.int64)
    steps = np.array([0, 7, 7, 123456], np.int32)
    lo, hi = (seeds & 0xFFFFFFFF).astype(np.uint32), (seeds >> 32).astype(np.uint32)
    with np.errstate(over="ignore"):
        keys = _lowbias32(_lowbias32(hi + np.uint32(0x9E3779B9)) ^ lo)
        key = _lowbias32(keys ^ steps.astype(np.uint32))
        columns = np.arange(50, dtype=np.uint32) * np.uint32(0x9E3779B9)
        bits = _lowbias32(key[:, None] + columns[None, :])
    want = ((bits >> 8).astype(np.float64) + 0.5) / 2**24

    def draw(s, t):
        return next_char.uniform(next_char.seed_keys(s), t, 50)

    for fn in (draw, tf.function(draw, jit_compile=True)):
        got = fn(tf.constant(seeds), tf.constant(steps)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-7)
    assert want.min() > 0 and want.max() < 1


def test_first_max_is_argmax_with_ties_on_cpu_and_under_xla():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 1024)).astype(np.float32)
    x[0, [7, 9]] = 50.0  # A tie: the first index, as argmax gives.
    x[1, :] = -np.inf
    x[1, 5] = 0.0
    want = np.argmax(x, axis=-1)
    assert want[0] == 7 and want[1] == 5
    xla = tf.function(next_char.first_max, jit_compile=True)
    for found in (next_char.first_max(tf.constant(x)), xla(tf.constant(x))):
        assert found.dtype == tf.int32 and (found.numpy() == want).all()


def test_draws_follow_the_softmax():
    # 20,000 rows with their own seeds draw from one distribution; the counts
    # must agree with its probabilities (chi-square, 7 degrees of freedom).
    logits = np.log(np.array([[0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02]], np.float32))
    rows = 20_000
    ids = next_char.choose(tf.constant(np.repeat(logits, rows, 0)),
                        next_char.seed_keys(tf.range(rows, dtype=tf.int64)),
                        tf.zeros([rows], tf.int32), tf.ones([rows]), tf.zeros([rows], tf.int32),
                        tf.ones([rows]), next_char.Rule()).numpy()
    counts = np.bincount(ids, minlength=8)
    expected = rows * np.exp(logits[0])
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3, (counts, expected)  # p = 0.001
    # The same rows one step later draw afresh, not a copy of step 0.
    later = next_char.choose(tf.constant(np.repeat(logits, rows, 0)),
                          next_char.seed_keys(tf.range(rows, dtype=tf.int64)),
                          tf.ones([rows], tf.int32), tf.ones([rows]),
                          tf.zeros([rows], tf.int32), tf.ones([rows]), next_char.Rule()).numpy()
    assert 0.15 < np.mean(later == ids) < 0.25  # sum(p^2) = 0.195 for independent draws


def test_large_batches_leave_xla_and_give_the_same_text(model, monkeypatch):
    sampler = Sampler(model, VOCAB)
    assert sampler.uses_xla(4) and not Sampler(model, VOCAB, jit_compile=False).uses_xla(4)
    small = sampler.generate(["the", "a b", "", "c"], 30, Settings(0.9, top_k=5), seed=2)
    # The same rows past the threshold run on the graph executor: the same text.
    monkeypatch.setattr("trainer.sampling.sampler.XLA_MAX_ROW_UNITS", 24 * 4)
    assert not sampler.uses_xla(4)
    assert sampler.generate(["the", "a b", "", "c"], 30, Settings(0.9, top_k=5),
                            seed=2) == small


@pytest.fixture(scope="module")
def token_jobs(tmp_path_factory) -> dict[str, str]:
    """A word and a bpe job; the bpe one trained with the per-epoch sample on (primed with
    tokens of the validation text)."""
    folder = str(tmp_path_factory.mktemp("tokens"))
    return {"word": token_job(folder, "word"), "bpe": token_job(folder, "bpe", sample_length=30)}


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_word_and_bpe_jobs_generate_whole_text_counted_in_chars(token_jobs, kind, capsys):
    values = flags.FlagValues()
    generate.define_flags(values)
    prompt = "the café — 🙂 "
    values(["generate", f"--job_dir={token_jobs[kind]}", f"--prime={prompt}", "--length=60",
            "--seed=3"])
    generate.run(values)
    text = capsys.readouterr().out
    # Never a U+FFFD: a character split across ids waits for its last byte, and a bpe
    # model never draws bytes that would not continue the text as UTF-8.
    assert len(text) >= 60 and "\ufffd" not in text
    _, tokenizer, model, _ = job_loader.load_job(token_jobs[kind])
    # The graph executor (the door's XLA loop gives the same text), no compile per length.
    sampler = Sampler(model, tokenizer, jit_compile=False)
    assert sampler.generate([prompt], 60, Settings(0.8), seed=3) == [text]
    # Stopping at 60 chars changes no draw: a longer text goes on from it.
    assert sampler.generate([prompt], 100, Settings(0.8), seed=3)[0].startswith(text)
    # The default prompt: seq_length tokens of the validation text, not characters.
    cfg = job_loader.load_job(token_jobs[kind])[0]
    window, source = excerpt.random_excerpt(cfg, 1, tokenizer)
    assert "16-token window" in source and len(window) > 16 and window in TOKEN_TEXT * 40
    # Blocks of 3 tokens continue one stream, rows of any length.
    prompts, settings = [prompt, "", "the dog"], Settings(1.2, top_k=20)
    blocks = list(sampler.stream(prompts, 45, settings, seed=7, block=3))
    assert ["".join(b[i] for b in blocks) for i in range(3)] == sampler.generate(
        prompts, 45, settings, seed=7)


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_word_and_bpe_generate_draws_blocks_not_a_token_per_character(token_jobs, kind,
                                                                      monkeypatch):
    _, tokenizer, model, _ = job_loader.load_job(token_jobs[kind])
    sampler = Sampler(model, tokenizer, jit_compile=False)
    widths = []
    advance = sampler.advance

    def counting(logits, states, n, *args, **kwargs):
        widths.append(n)
        return advance(logits, states, n, *args, **kwargs)

    monkeypatch.setattr(sampler, "advance", counting)
    want = sampler.generate(["the ", "a"], 300, Settings(0.8), seed=5)
    # Blocks of STREAM_BLOCK tokens, as many as the slower row needs: not 300 tokens.
    outputs = [OutputText(tokenizer, 300) for _ in want]
    drawn = widths[:]
    widths.clear()
    texts = ["", ""]
    for ids in sampler._draw([encode_prompt(tokenizer, p).ids for p in ("the ", "a")],
                             outputs, Settings(0.8), 5, 0):
        texts = [t + out.feed(row) for t, out, row in zip(texts, outputs, ids)]
    assert texts == want and widths == drawn
    needed = max(out.tokens for out in outputs)
    assert needed < 300 and set(drawn) == {STREAM_BLOCK}
    assert sum(drawn) == STREAM_BLOCK * -(-needed // STREAM_BLOCK)


def test_split_characters_come_out_whole_and_word_prompts_skip_whole(token_jobs):
    _, bpe, _, _ = job_loader.load_job(token_jobs["bpe"])
    emoji, a = bpe.encode("🎉"), bpe.encode("a")
    assert len(emoji) >= 2  # Not in the training text: its bytes are split.
    out = OutputText(bpe, 2)
    assert out.feed(a) == "a" and not out.done
    assert [out.feed([i]) for i in emoji] == [""] * (len(emoji) - 1) + ["🎉"]
    assert out.done and out.chars == 2
    more = OutputText(bpe, 2)
    assert more.feed(np.concatenate([a, emoji, a, emoji])) == "a🎉"
    assert more.tokens == 1 + len(emoji)
    _, word, _, _ = job_loader.load_job(token_jobs["word"])
    with pytest.raises(UserError, match="'#'"):
        encode_prompt(word, "the c#at")
    skipped = encode_prompt(word, "the c#at", oov="skip")
    assert skipped.skipped == ["#"] and list(skipped.ids) == list(word.encode("the cat"))
    assert start_id(word) == word.encode("\n")[0] and start_id(bpe) == bpe.encode("\n")[0]

