"""OpenAI's completions API on trainer.serve, through the official `openai` client, and a
Schemathesis run from the server's own OpenAPI schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
from serve_helpers import (
    VOCAB,
    LiveServer,
    module_job,
    request,
    same_logprobs,
    streamed_logprobs,
)
from training_jobs import token_job

from trainer.sampling.sampler import Sampler, Settings
from trainer.serving import backends, batcher, logprobs
from trainer.serving.completions import StopScanner

openai = pytest.importorskip("openai", reason="openai is in the test extra")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return module_job(tmp_path_factory.mktemp("openai"))


@pytest.fixture(scope="module")
def server(job):
    running = LiveServer(batcher.Batcher(backends.load_backend(job[0]), max_batch=8,
                                         window_ms=20, block=16))
    yield running
    running.close()


@pytest.fixture(scope="module")
def sampler(job):
    return Sampler(job[1], VOCAB)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="EMPTY", max_retries=0,
                         timeout=60)


def test_models_and_a_completion_equal_the_sampler(client, sampler):
    assert [m.id for m in client.models.list().data] == ["job"]
    out = client.completions.create(model="job", prompt="the cat", max_tokens=40, seed=3,
                                    temperature=0.9, extra_body={"colour": "ignored"})
    (choice,) = out.choices
    assert choice.text == sampler.generate(["the cat"], 40, Settings(0.9), [3])[0]
    assert choice.finish_reason == "length" and out.object == "text_completion"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (7, 40)
    greedy = client.completions.create(model="job", prompt="ab", max_tokens=20, temperature=0)
    assert greedy.choices[0].text == sampler.generate(["ab"], 20, Settings(greedy=True))[0]


def test_prompts_times_n_choices_and_the_stream_adds_up(client, sampler):
    out = client.completions.create(model="job", prompt=["the ", "a"], n=2, max_tokens=30,
                                    seed=10, top_p=0.8)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    want = [sampler.generate([p], 30, Settings(1.0, top_p=0.8), [10 + i])[0]
            for i, p in enumerate(["the ", "the ", "a", "a"])]
    assert [c.text for c in out.choices] == want
    chunks = list(client.completions.create(model="job", prompt=["the ", "a"], n=2,
                                            max_tokens=30, seed=10, top_p=0.8, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [""] * 4
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == want and chunks[-1].usage.completion_tokens == 120


def test_stop_ends_the_text_before_it_streamed_and_not(client, sampler):
    full = sampler.generate(["the "], 80, Settings(), [5])[0]
    stop = full[30:33]
    cut = full[:full.index(stop)]
    out = client.completions.create(model="job", prompt="the ", max_tokens=80, seed=5,
                                    temperature=0.8, stop=[stop, "\u00a7never"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(model="job", prompt="the ", max_tokens=80,
                                            seed=5, temperature=0.8, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    scanner = StopScanner(["xyz"])
    assert scanner.feed("abx") == ("a", False) and scanner.feed("yz!") == ("b", True)


def test_echo_starts_each_choice_with_its_prompt_streamed_and_not(client, sampler):
    asked = {"model": "job", "prompt": ["the ", "a"], "max_tokens": 25, "seed": 2,
             "temperature": 0.8, "echo": True}
    want = [p + sampler.generate([p], 25, Settings(), [2 + i])[0]
            for i, p in enumerate(["the ", "a"])]
    out = client.completions.create(**asked)
    assert [c.text for c in out.choices] == want
    assert out.usage.completion_tokens == 50  # The echoed prompts are not completion.
    streamed = ["", ""]
    chunks = list(client.completions.create(**asked, stream=True))
    for chunk in chunks:
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == want
    assert [c.choices[0].text for c in chunks[:2]] == ["the ", "a"]
    # Nothing to generate: the prompt alone.
    only = client.completions.create(model="job", prompt="to be", max_tokens=0, echo=True)
    assert (only.choices[0].text, only.choices[0].finish_reason) == ("to be", "length")
    with pytest.raises(openai.BadRequestError, match="echo must be true or false"):
        client.completions.create(model="job", prompt="a", extra_body={"echo": "yes"})
    with pytest.raises(openai.BadRequestError, match="suffix is not supported"):
        client.completions.create(model="job", prompt="a", suffix="b")


def _expected(model, tokenizer, ids) -> np.ndarray:
    """Log-softmax of the whole-sequence Keras model after every prefix of `ids` (float64)."""
    logits = model(np.asarray(ids, np.int32)[None], training=False).numpy()[0, :-1]
    logits = logits.astype(np.float64)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _check_logprobs(lp, model, tokenizer, ids, first: int, k: int) -> None:
    """`lp`'s scores against the Keras model: its tokens are ids[first:], and each is scored
    after all the ids before it (positions before 1 have none)."""
    expected = _expected(model, tokenizer, ids)
    names = {i: logprobs.token_name(tokenizer, i) for i in range(1, tokenizer.size)}
    assert lp.tokens == [names[int(i)] for i in ids[first:]]
    for j, token in enumerate(ids[first:], first):
        if j == 0:
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            continue
        got, top = lp.token_logprobs[j - first], lp.top_logprobs[j - first]
        assert got == pytest.approx(expected[j - 1, token], abs=1e-4)
        best = [i for i in np.argsort(-expected[j - 1]) if i != 0][:k]
        want = {names[int(i)]: expected[j - 1, i] for i in best}
        want.setdefault(names[int(token)], expected[j - 1, token])
        assert list(top) == list(want)[:len(top)] and set(top) == set(want)
        assert all(top[name] == pytest.approx(v, abs=1e-4) for name, v in want.items())


def test_logprobs_of_an_echoed_prompt_and_of_the_completion_are_the_models(client, sampler,
                                                                           job):
    model = job[1]
    # An evaluation harness's request: the prompt's own log-likelihood, nothing drawn.
    prompt = "the cat sat on the mat"
    out = client.completions.create(model="job", prompt=prompt, max_tokens=0, echo=True,
                                    logprobs=3)
    lp = out.choices[0].logprobs
    ids = VOCAB.encode(prompt)
    _check_logprobs(lp, model, VOCAB, ids, 0, 3)
    assert out.choices[0].text == prompt and lp.text_offset == list(range(len(prompt)))
    assert all(len(top) in (3, 4) for top in lp.top_logprobs[1:])
    # Drawn text: the same text as without logprobs; each token scored after the prompt
    # and the tokens drawn before it.
    asked = {"model": "job", "prompt": ["the ", ""], "max_tokens": 30, "seed": 3,
             "temperature": 0.9}
    plain = client.completions.create(**asked)
    out = client.completions.create(**asked, logprobs=0, echo=True)
    for choice, before, prompt in zip(out.choices, plain.choices, asked["prompt"]):
        assert choice.text == prompt + before.text
        text = before.text
        context = prompt or "\n"  # An empty prompt starts after a newline.
        _check_logprobs(choice.logprobs, model, VOCAB, VOCAB.encode(context + text),
                        1 if not prompt else 0, 0)
        assert choice.logprobs.text_offset == list(range(len(prompt + text)))
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])
    # A stop string: the tokens before the cut, scored as drawn.
    full = plain.choices[0].text
    stop = full[12:14]
    cut = client.completions.create(**{**asked, "prompt": "the "}, stop=stop, logprobs=1)
    assert cut.choices[0].text == full[:full.index(stop)]
    assert "".join(cut.choices[0].logprobs.tokens) == cut.choices[0].text
    assert cut.choices[0].logprobs.token_logprobs == pytest.approx(
        out.choices[0].logprobs.token_logprobs[4:4 + full.index(stop)])
    for bad in (6, -1, "2", True, 1.5):
        with pytest.raises(openai.BadRequestError, match="logprobs must be a whole number"):
            client.completions.create(model="job", prompt="a", extra_body={"logprobs": bad})


def test_a_streams_logprobs_add_up_to_the_answers(client, server):
    # Choices of three 16-token blocks: echoed prompt, two prompts, a stop string in one.
    asked = {"model": "job", "prompt": ["the ", "a"], "max_tokens": 40, "seed": 5,
             "temperature": 0.9, "echo": True, "logprobs": 2}
    whole = client.completions.create(**asked)
    before = server.batcher.stats().scored
    texts, joined = streamed_logprobs(client, asked, 2)
    # Each chunk fed only its new ids, from the states the last one ended in: every
    # position of the two rows (4 + 40 and 1 + 40 ids) scored once, as without stream.
    assert server.batcher.stats().scored - before == 43 + 40
    assert texts == [c.text for c in whole.choices]
    for got, c in zip(joined, whole.choices):
        same_logprobs(got, c.logprobs)
        assert "".join(got["tokens"]) == c.text
    text = whole.choices[0].text[4:]  # A stop string first seen in the second block.
    at = next(i for i in range(20, 36) if text.find(text[i:i + 3]) == i)
    cut = {**asked, "stop": text[at:at + 3], "echo": False}
    whole = client.completions.create(**cut)
    texts, joined = streamed_logprobs(client, cut, 2)
    assert texts == [c.text for c in whole.choices] and texts[0] == text[:at]
    for got, c in zip(joined, whole.choices):
        same_logprobs(got, c.logprobs)


def test_errors_in_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="job", prompt="a", max_tokens=301)
    with pytest.raises(openai.BadRequestError, match="stop takes up to 4"):
        client.completions.create(model="job", prompt="a", stop=list("abcde"))
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="job", messages=[{"role": "user",
                                                                "content": "hi"}])
    status, body = request(server.url("/v1/completions"), {"prompt": "a#", "max_tokens": 3})
    error = json.loads(body)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and "'#'" in error[
        "message"]
    # The message's advice works here too: "oov": "skip" leaves the '#' out.
    skipped = client.completions.create(model="job", prompt="a#", max_tokens=5, seed=4,
                                        extra_body={"oov": "skip"})
    plain = client.completions.create(model="job", prompt="a", max_tokens=5, seed=4)
    assert skipped.choices[0].text == plain.choices[0].text
    for extra, message in [({"seed": -1}, r"seed must be in \[0, "),
                           ({"stream": "yes"}, "stream must be true or false"),
                           ({"stream_options": "x"}, "stream_options must be an object"),
                           ({"oov": "drop"}, "oov must be one of error, skip")]:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model="job", prompt="a", extra_body=extra)
    # Half of a character's JSON escape is not text: no answer (an echo, a skipped list,
    # a stream's frames) could carry it back in UTF-8, so it is a 400 wherever it stands.
    lone = {"prompt": "a\ud800", "oov": "skip", "echo": True, "max_tokens": 3}
    for path, body in [("/v1/completions", lone), ("/v1/completions", {**lone, "stream": True}),
                       ("/tokenize", {"prompt": "a\ud800", "oov": "skip"}),
                       ("/v1/completions", {"prompt": "a", "stop": ["\udc80"]})]:
        status, answer = request(server.url(path), body)
        assert status == 400 and answer.count(b"\n") == 0, (path, answer)
        assert "lone surrogate(s) ('\\ud" in json.loads(answer)["error"]["message"]


def test_kserve_prefix(server, sampler):
    other = openai.OpenAI(base_url=server.url("/openai/v1"), api_key="EMPTY", max_retries=0)
    out = other.completions.create(model="job", prompt="to be", max_tokens=12, seed=2)
    assert out.choices[0].text == sampler.generate(["to be"], 12, Settings(1.0), [2])[0]


@pytest.fixture(scope="module")
def token_servers(tmp_path_factory):
    """A server of a word job and one of a bpe job, with a Sampler of each."""
    folder = str(tmp_path_factory.mktemp("tokens"))
    servers = {}
    for kind in ("word", "bpe"):
        # The graph executor: no XLA compile per batch size (both give the same text).
        backend = backends.load_backend(token_job(folder, kind), jit_compile=False)
        servers[kind] = (LiveServer(batcher.Batcher(backend, max_batch=4, window_ms=20,
                                                    block=8)),
                         Sampler(backend.sampler.model, backend.tokenizer, jit_compile=False))
    yield servers
    for running, _ in servers.values():
        running.close()


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_word_and_bpe_completions_equal_the_sampler_streamed_or_not(token_servers, kind):
    running, sampler = token_servers[kind]
    tokenizer = sampler.tokenizer
    client = openai.OpenAI(base_url=running.url("/v1"), api_key="EMPTY", max_retries=0,
                           timeout=60)
    prompt = "the café — 🙂"
    greedy = client.completions.create(model="m", prompt=prompt, max_tokens=40, temperature=0)
    want = sampler.generate([prompt], 40, Settings(greedy=True))[0]
    assert greedy.choices[0].text == want and len(want) >= 40
    # Usage counts the model's tokens, not characters.
    assert (greedy.usage.prompt_tokens, greedy.usage.completion_tokens) == (
        len(tokenizer.encode(prompt)), len(tokenizer.encode(want)))
    assert greedy.usage.prompt_tokens < len(prompt)
    asked = {"model": "m", "prompt": [prompt, ""], "max_tokens": 50, "seed": 4,
             "temperature": 1.0}
    out = client.completions.create(**asked)
    texts = [c.text for c in out.choices]
    assert texts == [sampler.generate([p], 50, Settings(1.0), [4 + i])[0]
                     for i, p in enumerate([prompt, ""])]
    streamed = ["", ""]
    for chunk in client.completions.create(**asked, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts
    assert request(running.url("/info"))[1] and json.loads(
        request(running.url("/info"))[1])["tokenizer"] == kind


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_tokenize_counts_what_usage_counts_and_detokenize_inverts_it(token_servers, kind):
    running, sampler = token_servers[kind]
    prompt = "the caf\u00e9 \u2014 \U0001f642 to"
    client = openai.OpenAI(base_url=running.url("/v1"), api_key="EMPTY", max_retries=0,
                           timeout=60)
    used = client.completions.create(model="m", prompt=prompt, max_tokens=1).usage
    answers = [request(running.url(path), {"model": "m", "prompt": prompt,
                                           "return_token_strs": True})
               for path in ("/tokenize", "/v1/tokenize", "/openai/v1/tokenize")]
    assert [status for status, _ in answers] == [200] * 3
    out = json.loads(answers[0][1])
    assert all(json.loads(body) == out for _, body in answers)
    assert out["tokens"] == sampler.tokenizer.encode(prompt).tolist()
    assert out["count"] == used.prompt_tokens == len(out["token_strs"]) < len(prompt)
    status, body = request(running.url("/detokenize"), {"tokens": out["tokens"]})
    assert (status, json.loads(body)) == (200, {"prompt": prompt})
    # OpenAI's error shape, as vLLM answers.
    status, body = request(running.url("/tokenize"), {"prompt": 7})
    error = json.loads(body)["error"]
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error["message"].startswith("prompt must be a string")
    status, body = request(running.url("/detokenize"), {"tokens": [0]})
    assert status == 400 and "whole numbers from 1" in json.loads(body)["error"]["message"]
    routes = json.loads(request(running.url("/info"))[1])["routes"]
    assert (routes["tokenize"], routes["detokenize"]) == ("/tokenize", "/detokenize")


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_word_and_bpe_logprobs_are_the_models_with_split_characters_named_as_bytes(
        token_servers, kind):
    running, sampler = token_servers[kind]
    tokenizer, model = sampler.tokenizer, sampler.model
    client = openai.OpenAI(base_url=running.url("/v1"), api_key="EMPTY", max_retries=0,
                           timeout=60)
    names = {logprobs.token_name(tokenizer, i): i for i in range(1, tokenizer.size)}
    assert len(names) == tokenizer.size - 1  # One name per id: names give the ids back.
    # A bpe model reads any text: U+1F643 is new to it, so its bytes span ids.
    prompt = "the caf\u00e9 \u2014 \U0001f642 tac" + (" \U0001f643" if kind == "bpe" else "")
    echoed = client.completions.create(model="m", prompt=prompt, max_tokens=0, echo=True,
                                       logprobs=2).choices[0].logprobs
    ids = tokenizer.encode(prompt)
    _check_logprobs(echoed, model, tokenizer, ids, 0, 2)
    pieces = [tokenizer.pieces[i] for i in ids]
    assert echoed.text_offset == [len(b"".join(pieces[:j]).decode("utf-8", "ignore"))
                                  for j in range(len(ids))]
    if kind == "bpe":  # The ids of a character's first bytes are named as bytes.
        assert [t for t in echoed.tokens if t.startswith("bytes:")][-2:] == [
            "bytes:\\x99", "bytes:\\x83"]
    else:  # "tac" is no word of the model: <unk>, then its spelling.
        assert "<unk>" in echoed.tokens
        assert "".join(t for t in echoed.tokens if t != "<unk>") == prompt
    asked = {"model": "m", "prompt": prompt, "max_tokens": 40, "seed": 4, "temperature": 1.0}
    text = client.completions.create(**asked).choices[0].text
    drawn = client.completions.create(**asked, logprobs=2).choices[0]
    assert drawn.text == text
    got = [names[t] for t in drawn.logprobs.tokens]
    assert tokenizer.decode(got) == text
    _check_logprobs(drawn.logprobs, model, tokenizer, np.concatenate([ids, got]), len(ids), 2)
    # Streamed in 8-token blocks: a split character's ids may straddle two chunks.
    texts, (joined,) = streamed_logprobs(client, {**asked, "logprobs": 2, "echo": True}, 1)
    assert texts == [prompt + text]
    same_logprobs(joined, client.completions.create(**asked, logprobs=2,
                                                      echo=True).choices[0].logprobs)


def test_schemathesis_finds_no_5xx_and_answers_conform(server):
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import checks
    from schemathesis.specs.openapi import checks as openapi_checks

    schema = schemathesis.openapi.from_url(server.url("/openapi.json"))
    run = [checks.not_a_server_error, openapi_checks.status_code_conformance,
           openapi_checks.content_type_conformance, openapi_checks.response_schema_conformance]
    tried = 0
    for found in schema.get_all_operations():
        operation = found.ok()
        # Valid requests, then requests that break the schema (where one can: a route
        # without parameters or a body has no invalid request).
        for mode in schemathesis.GenerationMode:

            @settings(max_examples=8, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(mode))
            def fuzz(case):
                case.call_and_validate(base_url=server.url(""), checks=run, timeout=60)

            try:
                fuzz()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE
                continue
            tried += 1
    assert tried >= 15
    assert request(server.url("/health"))[0] == 200
