"""Tests for trainer.serving.tokenize: vLLM's /tokenize and /detokenize answers for char,
word and bpe tokenizers, and their one-line errors (the routes over HTTP are tested in
test_serving_openai.py)."""

from __future__ import annotations

import json

import pytest

from trainer.data import tokenization
from trainer.data.tokenization import UNK, BpeTokenizer, WordTokenizer
from trainer.data.vocabulary import Vocabulary, count_chars
from trainer.serving.request import Limits, RequestError
from trainer.serving.tokenize import detokenize, max_model_len, tokenize

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to "
        "suffer\nThe slings and arrows of outrageous fortune,\n") * 6 + "caf\u00e9 \u4e16\u754c\n"
LIMITS = Limits(max_length=100, max_prompt_chars=200)


def _tokenizers() -> dict[str, tokenization.Tokenizer]:
    chars = Vocabulary.from_counts(count_chars(TEXT))
    return {"char": chars,
            "word": WordTokenizer.from_counts(chars, tokenization.count_words(TEXT), 60),
            "bpe": BpeTokenizer.train([TEXT], 300)}


TOKENIZERS = _tokenizers()


def _ask(fn, tokenizer, **body):
    return fn(tokenizer, json.dumps(body).encode(), LIMITS)


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_tokens_are_the_models_ids_and_detokenize_gives_the_text_back(kind):
    tokenizer = TOKENIZERS[kind]
    prompt = "The slings of the mind, caf\u00e9 \u4e16 whether"
    out = _ask(tokenize, tokenizer, prompt=prompt, model="anything", add_special_tokens=True)
    assert out["tokens"] == tokenizer.encode(prompt).tolist()
    assert out["count"] == len(out["tokens"]) and out["token_strs"] is None
    assert out["max_model_len"] == max_model_len(LIMITS) == 300
    assert "skipped" not in out
    # Whole words and merges make fewer ids than characters, except for characters.
    assert (out["count"] == len(prompt)) == (kind == "char")
    assert _ask(detokenize, tokenizer, tokens=out["tokens"]) == {"prompt": prompt}
    assert _ask(tokenize, tokenizer, prompt="")["tokens"] == []


def test_token_strs_name_each_id_as_its_tokenizer_does():
    prompt = "Whether the question, caf\u00e9 fortunes"
    strs = {kind: _ask(tokenize, tok, prompt=prompt, return_token_strs=True)["token_strs"]
            for kind, tok in TOKENIZERS.items()}
    assert strs["char"] == list(prompt)
    # A word outside the vocabulary is <unk> followed by its spelling.
    word = strs["word"]
    assert "".join(s for s in word if s != UNK) == prompt and UNK in word
    assert " question" in word and word[word.index(UNK) + 1:][:5] == list(" caf\u00e9")
    # The library's own names for the tokens (bytes as symbols, "Ġ" for a space), as
    # vLLM returns them.
    bpe = TOKENIZERS["bpe"]
    assert strs["bpe"] == bpe.hf.encode(prompt).tokens
    assert any(s.startswith("\u0120") for s in strs["bpe"])


def test_characters_no_training_text_held_are_refused_or_skipped():
    chars = TOKENIZERS["char"]
    with pytest.raises(RequestError, match=r"2 character\(s\).*'Q', 'Z'.*\"oov\": \"skip\""):
        _ask(tokenize, chars, prompt="Quit Zen")
    out = _ask(tokenize, chars, prompt="Quit Zen", oov="skip", return_token_strs=True)
    assert out["skipped"] == ["Q", "Z"] and "".join(out["token_strs"]) == "uit en"
    # A bpe model encodes any text, but a lone surrogate (JSON's "\ud800") is not text.
    bpe = TOKENIZERS["bpe"]
    assert "skipped" not in _ask(tokenize, bpe, prompt="Quiz \U0001f389")
    for tokenizer in TOKENIZERS.values():
        for oov in ("error", "skip"):  # "skip" too: its list could not carry one back.
            with pytest.raises(RequestError, match=r"'prompt' holds 1 lone surrogate\(s\) "
                               r"\('\\ud800'\): half of a character's JSON escape"):
                _ask(tokenize, tokenizer, prompt="to\ud800be", oov=oov)
    with pytest.raises(tokenization.UserError, match="1 lone surrogate"):
        bpe.encode("A\udc80")


@pytest.mark.parametrize("body, message", [
    ({"prompt": ["a", "b"]}, "prompt must be a string"),
    ({}, "prompt must be a string"),
    ({"prompt": "x" * 201}, "at most 200 characters, got 201"),
    ({"prompt": "to", "return_token_strs": "yes"}, "return_token_strs must be true or false"),
    ({"prompt": "to", "add_special_tokens": 1}, "add_special_tokens must be true or false"),
    ({"prompt": "to", "oov": "drop"}, "oov must be one of error, skip"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no chat template"),
])
def test_bad_tokenize_requests_get_one_line(body, message):
    with pytest.raises(RequestError, match=message) as err:
        tokenize(TOKENIZERS["word"], json.dumps(body).encode(), LIMITS)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tokens", [[0], [1, 2, 10_000], [True], ["a"], [1.5], "12", None])
def test_detokenize_takes_only_the_models_ids(tokens):
    bpe = TOKENIZERS["bpe"]
    with pytest.raises(RequestError, match=f"whole numbers from 1 to {bpe.size - 1}"):
        _ask(detokenize, bpe, tokens=tokens)


def test_detokenize_bounds_the_ids_and_marks_a_split_character():
    bpe = TOKENIZERS["bpe"]
    with pytest.raises(RequestError, match="at most 1200 ids, got 1201"):
        _ask(detokenize, bpe, tokens=[5] * 1201)
    # The first byte of a 3-byte character alone: U+FFFD, not an error.
    ids = bpe.encode("\u4e16").tolist()
    first = next(i for i in range(1, bpe.size) if bpe.pieces[i] == "\u4e16".encode()[:1])
    assert _ask(detokenize, bpe, tokens=[first])["prompt"] == "\ufffd"
    assert _ask(detokenize, bpe, tokens=ids)["prompt"] == "\u4e16"
