"""trainer.export --format=web and --format=onnx for word and bpe jobs.

One tiny word job and one tiny bpe job are trained for the module on a corpus with
accented Latin, a dash and CJK in it. The page's tokenizers (tokenizer.js) must
encode as the Python tokenizers do and its greedy text must equal a greedy loop over
the Keras model's own step (`step_model.keras_step`), with the length counted in
characters of output (the first token that reaches it is the last), a bpe page
drawing only ids that keep the text valid UTF-8 (even from a model forced to prefer
the others). The ONNX folder's tokenizer.json, read by the `tokenizers` library with
the +1 id offset, must drive onnxruntime to the same greedy text.
"""

from __future__ import annotations

import json
import os
import random

import keras
import numpy as np
import pytest
from test_export_formats import CHROMIUM, DRIVER, _run_export, needs_chromium
from training_jobs import tiny

from trainer import job_loader
from trainer.data.tokenization import UNK_ID
from trainer.data.vocabulary import OOV_ID, Vocabulary
from trainer.sampling import step_model, web_export
from trainer.sampling.sampler import Sampler, Settings, encode_prompt, start_id
from trainer.sampling.utf8 import tables_of

SENTENCE = ("the cat sat on the mat; it's a dog ran in the fog. café naïve — 日本語 über "
            "ROMEO: But soft, what light through yonder window breaks?\n")
# ASCII, accents, a dash, CJK and a \r\n the page must normalise (emoji: bpe below).
PROMPT = "ROMEO: the café — 日本語 über\r\nthe dog's"
# Where Python's \s, JavaScript's \s and Unicode's White_Space part: \x1c, \x85, \ufeff.
ENCODED = [PROMPT, "But soft! naïve café—über 日本 x_1 42",
           "  \n\n\tthe  cat\u00a0sat\x85. \x85 \x1c \ufeff", "I'm we've they'll 's 'S",
           "Zürich ÉCOLE ①②"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """{kind: (tokenizer, model, web folder)} and the bpe ONNX folder."""
    from trainer.training import train

    tmp = tmp_path_factory.mktemp("tokenizers")
    corpus = tmp / "corpus.txt"
    words, rng = SENTENCE.split(" "), random.Random(0)
    corpus.write_text(" ".join(rng.choice(words) for _ in range(3000)), encoding="utf-8")
    out = {}
    for kind, max_vocab in (("word", 200), ("bpe", 400)):
        job_dir = tmp / f"job_{kind}"
        train.train(tiny(str(corpus), job_dir, tokenizer=kind, max_vocab=max_vocab, epochs=1,
                         steps_per_epoch=30, sample_length=0))
        _run_export("--format=web", f"--job_dir={job_dir}", f"--export_dir={tmp / kind}")
        _, tok, model, _ = job_loader.load_job(str(job_dir))
        out[kind] = tok, model, tmp / kind
    _run_export("--format=onnx", f"--job_dir={tmp / 'job_bpe'}", f"--export_dir={tmp / 'onnx'}")
    return out, tmp / "onnx"


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def greedy(tok, prompt_ids: list[int], length: int, step, utf8: bool = True
           ) -> tuple[str, list[int]]:
    """Greedy text of at least `length` chars (ids drawn until the text reaches it), and
    the ids drawn.

    Args:
      tok: decodes the ids (its stream decoder).
      prompt_ids: fed first (a newline's id when empty).
      length: characters of output asked for.
      step: one carried step, id -> raw logits (vocab,).
      utf8: for bpe, mask the ids that would break UTF-8, as every sampler does.
    """
    logits = None
    for i in prompt_ids or [start_id(tok)]:
        logits = step(i)
    tables = tables_of(tok) if utf8 else None
    state = 0 if tables is None else tables.state_after(prompt_ids)
    decoder, text, drawn = tok.stream_decoder(), "", []
    while len(text) < length:
        logits = np.array(logits, np.float64)
        logits[OOV_ID] = -np.inf
        logits[[i for i, piece in enumerate(tok.pieces) if not piece]] = -np.inf  # <unk>
        if tables is not None:
            logits += tables.mask()[state]
        drawn.append(int(np.argmax(logits)))
        if tables is not None:
            state = int(tables.next[state, drawn[-1]])
        text += decoder.feed(drawn[-1:])
        logits = step(drawn[-1])
    return text + decoder.flush(), drawn


def keras_stepper(model):
    """A carried step through the Keras layers, from a zero state."""
    units = step_model.step_weights(model).units
    states = [np.zeros((1, units[i // 2]), np.float32) for i in range(2 * len(units))]

    def step(i: int) -> np.ndarray:
        logits, states[:] = step_model.keras_step(model, np.array([i], np.int32), states)
        return logits[0]

    return step


@needs_chromium
@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_page_encodes_decodes_and_generates_like_python(jobs, browser, kind):
    tok, model, web_dir = jobs[0][kind]
    files = sorted(os.listdir(web_dir))
    assert files == ["charmodel.js", "index.html", "model.js", "tokenizer.js",
                     "tokenizer.json", "vocab.json"]
    assert (web_dir / "tokenizer.json").read_text() == tok.to_json()
    browser.get((web_dir / "index.html").as_uri())
    run = browser.execute_script
    assert run("return window.charModel.tokenizer.kind") == kind
    assert run("return window.charModel.vocabSize") == tok.size

    texts = ENCODED + (["emoji 😀🎉 日本語"] if kind == "bpe" else [])
    got = run("return arguments[0].map((t) => window.charModel.tokenizer.encode(t))", texts)
    assert got == [tok.encode(t).tolist() for t in texts]
    # As a prompt: normalised (\r\n), then the ids of chars the model lacks left out.
    skip = encode_prompt(tok, PROMPT + " Q", "skip")
    assert run("return window.charModel.encode(arguments[0], true).ids",
               PROMPT + " Q") == skip.ids.tolist()
    if kind == "word":
        assert tok.encode(PROMPT).tolist().count(1) >= 1  # A word spelled after <unk>.
        message = run("try { window.charModel.encode('the Q', false); return ''; } "
                      "catch (e) { return e.message; }")
        assert "1 character(s) the model's vocabulary lacks: 'Q'" in message

    # Each id decoded as it arrives: a char split across bpe ids comes out whole.
    text = "über 日本語 café" + (" 😀" if kind == "bpe" else "")
    ids = tok.encode(text).tolist()
    parts = run("const d = window.charModel.tokenizer.decoder(); "
                "return arguments[0].map((i) => d.feed(i)).concat([d.flush()])", ids)
    assert "".join(parts) == text
    if kind == "bpe":
        assert "" in parts[:-1]  # The emoji's bytes span ids that alone decode to nothing.

    generate = "return window.charModel.generate(arguments[0], arguments[1], {temperature: 0})"
    for prompt, length in ((PROMPT, 60), ("", 25)):
        expected, _ = greedy(tok, encode_prompt(tok, prompt).ids.tolist(), length,
                             keras_stepper(model))
        page_text = run(generate, prompt, length)
        assert page_text == expected
        assert len(page_text) >= length
    tokens = run("return [...window.charModel.stream(arguments[0], 40, {temperature: 0})]",
                 PROMPT)
    # The last id drawn is the first whose text reaches 40 chars.
    assert len("".join(tokens[:-1])) < 40 <= len("".join(tokens))
    # Seeded sampling draws the same ids as Python's sampler (the same counter-based draw).
    sampler = Sampler(model, tok)
    for temperature, top_k, top_p, seed in ((0.9, 0, 1.0, 7), (1.2, 5, 0.9, 3)):
        options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        page_text = run("return window.charModel.generate(arguments[0], 80, arguments[1])",
                        PROMPT, options)
        assert page_text == sampler.generate([PROMPT], 80, Settings(temperature, top_k, top_p),
                                             seed=seed)[0], (temperature, seed)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def _forced_page(model, tok, web_dir, folder, boosts: dict[int, float]) -> keras.Model:
    """A copy of `model` whose logits' bias favours the ids of `boosts` by as much, exported
    as a web page into `folder`."""
    forced = keras.models.clone_model(model)
    forced.set_weights(model.get_weights())
    dense = forced.get_layer("logits")
    bias = dense.bias.numpy()
    for i, boost in boosts.items():
        bias[i] += boost
    dense.bias.assign(bias)
    web_export.export(forced, tok, str(folder), chars=Vocabulary.load(
        str(web_dir / "vocab.json")))
    return forced


@needs_chromium
def test_bpe_page_never_draws_ids_that_break_utf8(jobs, browser, tmp_path):
    tok, model, web_dir = jobs[0]["bpe"]
    # A lone continuation byte comes first everywhere, a lone lead byte second.
    forced = _forced_page(model, tok, web_dir, tmp_path, {tok.pieces.index(b"\x80"): 100.0,
                                                          tok.pieces.index(b"\xe6"): 50.0})
    browser.get((tmp_path / "index.html").as_uri())
    run = browser.execute_script
    tables = tables_of(tok)
    got = run("const u = window.charModel.tokenizer.utf8, n = arguments[0], s = arguments[1];"
              "const out = []; for (let a = 0; a < s; a++) { const row = []; "
              "const m = u.mask(new Float32Array(n), a); "
              "for (let i = 0; i < n; i++) row.push(m[i] === 0 ? u.after(a, i) : -1); "
              "out.push(row); } return out;", tok.size, tables.next.shape[0])
    assert got == np.where(tables.allowed, tables.next, -1).tolist()
    prompt_ids = encode_prompt(tok, PROMPT).ids.tolist()
    unmasked, _ = greedy(tok, prompt_ids, 60, keras_stepper(forced), utf8=False)
    assert "\ufffd" in unmasked  # The forced model breaks UTF-8 when nothing stops it.
    expected, _ = greedy(tok, prompt_ids, 60, keras_stepper(forced))
    assert "\ufffd" not in expected and "\u6000" in expected  # e6 80 80
    assert run("return window.charModel.generate(arguments[0], 60, {temperature: 0})",
               PROMPT) == expected
    for seed in (1, 2):
        text = run("return window.charModel.generate(arguments[0], 80, "
                   "{temperature: 1.2, seed: arguments[1]})", PROMPT, seed)
        assert len(text) >= 80 and "\ufffd" not in text
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@needs_chromium
def test_word_page_never_draws_unk_as_python_never_does(jobs, browser, tmp_path):
    tok, model, web_dir = jobs[0]["word"]
    # <unk> first everywhere: it writes nothing, so it is masked.
    forced = _forced_page(model, tok, web_dir, tmp_path, {UNK_ID: 100.0})
    browser.get((tmp_path / "index.html").as_uri())
    run = browser.execute_script
    assert run("return window.charModel.tokenizer.silent") == [UNK_ID]
    sampler = Sampler(forced, tok)
    expected, drawn = greedy(tok, encode_prompt(tok, PROMPT).ids.tolist(), 40,
                             keras_stepper(forced))
    assert UNK_ID not in drawn and len(expected) >= 40
    assert run("return window.charModel.generate(arguments[0], 40, {temperature: 0})",
               PROMPT) == expected == sampler.generate([PROMPT], 40, Settings(greedy=True))[0]
    for seed in (1, 2):
        tokens = run("return [...window.charModel.stream(arguments[0], 60, "
                     "{temperature: 1.0, seed: arguments[1]})]", PROMPT, seed)
        assert "" not in tokens  # Every id drawn wrote text: none was <unk>.
        assert "".join(tokens) == sampler.generate([PROMPT], 60, Settings(1.0), seed=seed)[0]
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@needs_chromium
def test_word_page_generates_through_its_prompt_box(jobs, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tok, model, web_dir = jobs[0]["word"]
    browser.get((web_dir / "index.html").as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text == "Word-level LSTM"
    assert f"vocabulary {tok.size} word tokens" in browser.find_element(By.ID, "model").text
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys("the cat")
    for field, value in (("length", "50"), ("temperature", "0")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(
        lambda b: b.find_element(By.ID, "status").text.startswith(("done", "error")))
    shown = browser.execute_script("return document.getElementById('text').textContent")
    status = browser.find_element(By.ID, "status").text
    assert shown == greedy(tok, tok.encode("the cat").tolist(), 50, keras_stepper(model))[0]
    assert status.startswith(f"done: {len(shown)} chars"), status


def test_onnx_export_carries_the_bpe_tokenizer(jobs):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")
    from tokenizers import Tokenizer

    tok, model, _ = jobs[0]["bpe"]
    onnx_dir = jobs[1]
    assert sorted(os.listdir(onnx_dir)) == ["model.json", "model.onnx", "tokenizer.json",
                                            "vocab.json"]
    described = json.loads((onnx_dir / "model.json").read_text())
    assert described["tokenizer"]["kind"] == "bpe"
    assert "id + 1" in described["tokenizer"]["ids"]
    assert described["vocab_size"] == tok.size
    assert json.loads((onnx_dir / "vocab.json").read_text())["chars"]

    hf = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    prompt = PROMPT.replace("\r\n", "\n")
    ids = [i + 1 for i in hf.encode(prompt, add_special_tokens=False).ids]
    assert ids == tok.encode(prompt).tolist()

    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"))
    names = described["inputs"][1:]
    state = {n: np.zeros((1, described["units"][int(n[1:])]), np.float32) for n in names}

    def step(i: int) -> np.ndarray:
        logits, *after = session.run(described["outputs"],
                                     {"ids": np.array([i], np.int32), **state})
        state.update(zip(names, after, strict=True))
        return logits[0]

    expected, _ = greedy(tok, ids, 80, keras_stepper(model))
    text, drawn = greedy(tok, ids, 80, step)
    assert text == expected
    # Decoded by the exported file alone, the ids drawn give the same text.
    assert hf.decode([i - 1 for i in drawn]) == expected
